"""Image-quality metrics computed the way the published tables compute them.

Protocol (see shared/notes/evaluation.md):
- Images are quantised to uint8 (round, clip 0..255) before any metric, as a result saved to PNG is.
- PSNR = 10 log10(255^2 / MSE) in float64. PSNR is capped at `PSNR_CAP` (100 dB): identical images
  (MSE 0, PSNR inf) report 100, so means over a test set stay finite.
- SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, L 255, 'valid'
  filtering (no padding); on colour images the mean over channels (`ssim_definition="wang"`).
- MATLAB's built-in `ssim(A, ref)` (`ssim_definition="matlab"`), which the deblurring papers' scripts
  call on RGB uint8 images (MPRNet's and Restormer's Motion_Deblurring/evaluate_gopro_hide.m): the
  image is converted to double, L = 255, C1 = (0.01 L)^2, C2 = (0.03 L)^2, C3 = C2/2 with exponents
  [1 1 1] (so Wang's two-term formula); every array of three dimensions, RGB included, is a 3-D volume
  filtered by one isotropic Gaussian of sigma 1.5 ('Radius') over 2 ceil(3 sigma) + 1 = 11 samples per
  axis with 'replicate' padding (the depth-3 colour axis too), and the value is the mean of the
  full-size map. MathWorks' ssim.m (Image Processing Toolbox, copyright 2013-2014 with imfilter of an
  11x11x11 kernel, and 2013-2017 with imgaussfilt3, 'FilterSize' 11, 'Padding' 'replicate'; both
  read in public copies) and MATLAB Answers 2142916 (R2023b: the default 'DataFormat' is 'SSS', three
  spatial axes; 'SSC' would give the per-channel values).
- Y channel: MATLAB `rgb2ycbcr` luma (BT.601, 16..235): Y = 16 + (65.481 R + 128.553 G + 24.966 B)/255,
  rounded to an integer, because `rgb2ycbcr` returns uint8 for the uint8 images that the deraining
  evaluation script (MPRNet's and Restormer's evaluate_PSNR_SSIM.m) reads with `imread`. Keeping Y
  unrounded (as BasicSR does) reads about 0.15 dB higher at 40 dB and 0.5 dB higher at 47 dB.
- Optional border crop of `crop_border` pixels on every side, after the Y conversion.

RealBlur's evaluation aligns each result to its target first (workloads/alignment.py).

`psnr`/`ssim` are the numpy reference (one HxWxC or HxW uint8 image pair); `psnr_batch`/`ssim_batch`
are the batched torch versions used during training validation (NCHW floats in [0, 1]); the tests
hold them to agree. Spectral reconstruction uses MRAE, RMSE and PSNR on float cubes instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

# torch and scipy are imported where they are used: workloads/tasks.py builds its task catalogue from
# this module, and `restorch --help` lists the tasks without importing torch (seconds).
if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT")  # numpy arrays or torch tensors: the SSIM formula takes both
PSNR_CAP = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0
SSIM_DEFINITIONS = ("wang", "matlab")  # Wang's per channel, 'valid'; MATLAB's ssim (RGB as one volume)
Y_WEIGHTS = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr, for R, G, B in 0..255
SPECTRAL_CROP = 128  # NTIRE 2022 evaluates cubes on [128:-128, 128:-128]


def quantize(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded and clipped as when saving a PNG."""
    return np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()


# ------------------------------------------------------------------------------------------------
# numpy reference (one image pair)


def _prepare(pred: np.ndarray, target: np.ndarray, y_channel: bool, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a uint8 pair and return float64 HxWxC arrays in 0..255 (Y or RGB), border-cropped."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {pred.shape} vs {target.shape}")
    if pred.dtype != np.uint8 or target.dtype != np.uint8:
        raise ValueError(
            f"metrics take uint8 images (got {pred.dtype}, {target.dtype}); "
            "quantise float images in [0, 1] with workloads.metrics.quantize first"
        )
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {pred.shape}")
    images = []
    for image in (pred, target):
        image = image.astype(np.float64)
        if image.ndim == 2:
            image = image[..., None]
        if y_channel:
            image = rgb_to_y(image)[..., None]
        if crop_border:
            image = image[crop_border:-crop_border, crop_border:-crop_border]
        images.append(image)
    return images[0], images[1]


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma of an HxWx3 uint8 RGB image: integers 16..235 (as float64)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Y channel needs an HxWx3 RGB image, got shape {image.shape}")
    return np.floor(16.0 + image.astype(np.float64) @ np.array(Y_WEIGHTS) / 255.0 + 0.5)  # MATLAB rounds halves up


def psnr(pred: np.ndarray, target: np.ndarray, *, y_channel: bool = False, crop_border: int = 0) -> float:
    """PSNR in dB between two uint8 images (HxWxC or HxW), capped at PSNR_CAP."""
    a, b = _prepare(pred, target, y_channel, crop_border)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return PSNR_CAP
    return min(10.0 * math.log10(PEAK**2 / mse), PSNR_CAP)


def _ssim_formula(blur: Callable, a: ArrayT, b: ArrayT, peak: float = PEAK) -> ArrayT:
    """Wang's SSIM map (his equation 13) from moments weighted by `blur`; numpy arrays or torch tensors."""
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim_map(a: np.ndarray, b: np.ndarray, *, peak: float = PEAK) -> np.ndarray:
    """SSIM map of two float64 2-D images; 'valid' Gaussian filtering, so smaller by 10 per axis."""
    from scipy.ndimage import correlate1d

    window = _gaussian_window()
    margin = SSIM_WINDOW // 2

    def blur(x: np.ndarray) -> np.ndarray:
        x = correlate1d(correlate1d(x, window, axis=0), window, axis=1)
        return x[margin:-margin, margin:-margin]

    return _ssim_formula(blur, a, b, peak)


def _channel_mixing(channels: int) -> np.ndarray:
    """MATLAB's Gaussian along the third axis of an HxWxC volume with 'replicate' padding, as a CxC
    matrix (output channel x input channel): the taps that fall outside the volume weigh on its edge."""
    margin = SSIM_WINDOW // 2
    mixing = np.zeros((channels, channels))
    for out in range(channels):
        for offset, weight in zip(range(-margin, margin + 1), _gaussian_window()):
            mixing[out, min(max(out + offset, 0), channels - 1)] += weight
    return mixing


def matlab_ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MATLAB `ssim`'s full-size map of two float64 HxWxC volumes (C = 1: a 2-D image): one 11x11x11
    Gaussian (separable, so rows, columns, then channels) with 'replicate' padding on every axis."""
    from scipy.ndimage import correlate1d

    window, mixing = _gaussian_window(), _channel_mixing(a.shape[-1])

    def blur(x: np.ndarray) -> np.ndarray:
        x = correlate1d(correlate1d(x, window, axis=0, mode="nearest"), window, axis=1, mode="nearest")
        return x @ mixing.T

    return _ssim_formula(blur, a, b)


def _check_definition(definition: str) -> None:
    if definition not in SSIM_DEFINITIONS:
        raise ValueError(f"unknown SSIM definition {definition!r}; choose one of {', '.join(SSIM_DEFINITIONS)}")


def ssim(pred: np.ndarray, target: np.ndarray, *, y_channel: bool = False, crop_border: int = 0,
         definition: str = "wang") -> float:
    """SSIM between two uint8 images (HxWxC or HxW). "wang": colour images average their channels;
    "matlab": MATLAB's `ssim`, a colour image being one volume."""
    _check_definition(definition)
    a, b = _prepare(pred, target, y_channel, crop_border)
    if definition == "matlab":
        return float(matlab_ssim_map(a, b).mean())
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, got {a.shape[:2]}")
    return float(np.mean([ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[-1])]))


def realblur_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of two uint8 RGB images as RealBlur's evaluation measures them: `pred` aligned to
    `target` (workloads.alignment), then on images in [0, 1] (peak 1) over the pixels the warped result
    covers: PSNR of the squared error summed over the mask and divided by its size; SSIM per channel as
    the masked mean of the 'valid' map (the script crops 5 px of skimage's full map), then averaged."""
    from workloads.alignment import align_to_target

    _prepare(pred, target, False, 0)
    if pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"RealBlur's alignment takes HxWx3 RGB images, got shape {pred.shape}")
    aligned, reference, mask = align_to_target(pred.astype(np.float32) / 255, target.astype(np.float32) / 255)
    error = np.sum((reference - aligned) ** 2, dtype=np.float64) / np.sum(mask, dtype=np.float64)
    margin = SSIM_WINDOW // 2
    inside = mask[margin:-margin, margin:-margin].astype(np.float64)
    aligned, reference = aligned.astype(np.float64), reference.astype(np.float64)
    per_channel = [np.sum(ssim_map(reference[..., c], aligned[..., c], peak=1.0) * inside[..., c]) / np.sum(inside[..., c])
                   for c in range(3)]
    return {"psnr": PSNR_CAP if error == 0 else min(-10.0 * math.log10(error), PSNR_CAP), "ssim": float(np.mean(per_channel))}


# ------------------------------------------------------------------------------------------------
# torch, batched (NCHW floats in [0, 1]); computed in float64 so they agree with the reference


def _prepare_batch(pred: torch.Tensor, target: torch.Tensor, y_channel: bool, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two NCHW tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    images = []
    for image in (pred, target):
        image = (image.detach().to(torch.float64).clamp(0, 1) * 255.0).round()
        if y_channel:
            weights = image.new_tensor(Y_WEIGHTS).view(1, 3, 1, 1)
            image = torch.floor(16.0 + (image * weights).sum(dim=1, keepdim=True) / 255.0 + 0.5)
        if crop_border:
            image = image[..., crop_border:-crop_border, crop_border:-crop_border]
        images.append(image)
    return images[0], images[1]


def psnr_batch(pred: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Per-image PSNR (float64 tensor of shape N) of NCHW float batches in [0, 1], capped at PSNR_CAP."""
    import torch

    a, b = _prepare_batch(pred, target, y_channel, crop_border)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(PEAK**2 / mse)).clamp(max=PSNR_CAP)  # mse 0 gives inf, clamped


def ssim_batch(pred: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0,
               definition: str = "wang") -> torch.Tensor:
    """Per-image SSIM (float64 tensor of shape N) of NCHW float batches in [0, 1]; `definition` as in `ssim`."""
    import torch
    import torch.nn.functional as F

    _check_definition(definition)
    a, b = _prepare_batch(pred, target, y_channel, crop_border)
    channels = a.shape[1]
    window = torch.from_numpy(_gaussian_window()).to(a.device)
    rows = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    mixing = torch.from_numpy(_channel_mixing(channels)).to(a.device)
    margin = SSIM_WINDOW // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        if definition == "matlab":
            x = F.pad(x, (margin,) * 4, mode="replicate")
        x = F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)
        return torch.einsum("ok,nkhw->nohw", mixing, x) if definition == "matlab" else x

    # every channel's map has the same size: the mean over the map is the mean of channel means
    return _ssim_formula(blur, a, b).flatten(1).mean(dim=1)


# ------------------------------------------------------------------------------------------------
# spectral reconstruction (NTIRE 2022): float cubes, NCHW tensors, per-image values of shape N

MRAE_EPS = 1e-6  # guards the division where a reference band is exactly 0


def spectral_crop(cube: torch.Tensor) -> torch.Tensor:
    """The NTIRE crop [128:-128, 128:-128] of an NCHW cube; smaller cubes (e.g. synthetic ones of
    256x256 or less, where the crop would leave nothing) are evaluated whole."""
    height, width = cube.shape[-2:]
    if min(height, width) <= 2 * SPECTRAL_CROP:
        return cube
    return cube[..., SPECTRAL_CROP:-SPECTRAL_CROP, SPECTRAL_CROP:-SPECTRAL_CROP]


def mrae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean relative absolute error |pred - target| / target per image; also the training loss."""
    return ((pred - target).abs() / target.clamp(min=MRAE_EPS)).flatten(1).mean(dim=1)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per image."""
    return ((pred - target) ** 2).flatten(1).mean(dim=1).sqrt()


def spectral_psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR per image of cubes clipped to [0, 1] (peak 1), capped at PSNR_CAP."""
    import torch

    mse = ((pred.clamp(0, 1) - target.clamp(0, 1)) ** 2).flatten(1).mean(dim=1)
    return (-10.0 * torch.log10(mse)).clamp(max=PSNR_CAP)


# ------------------------------------------------------------------------------------------------
# protocol: which of the above a task reports, recorded with every result

COLOR_SPACES = ("rgb", "y", "spectral")
ALIGNMENTS = ("realblur-ecc",)
# Recorded with every result: raise it when a change to the protocols changes the numbers they give.
PROTOCOL_VERSION = 1


def _cube_batch(cube: np.ndarray) -> torch.Tensor:
    """HxWxB numpy cube -> 1xBxHxW float64 tensor."""
    import torch

    return torch.from_numpy(np.asarray(cube, dtype=np.float64)).permute(2, 0, 1)[None]


@dataclass(frozen=True)
class Protocol:
    """How a task's results are measured. Every result carries `as_dict()` (or `describe()`), so a
    number is never separated from the protocol it was computed under."""

    color_space: str  # "rgb" or "y": PSNR/SSIM on uint8 images; "spectral": MRAE/RMSE/PSNR on cubes
    crop_border: int = 0
    noise_sigma: float | None = None  # Gaussian denoising: noise of the inputs, 0..255 scale
    ssim_definition: str = "wang"  # "wang": per channel, 'valid'; "matlab": MATLAB's ssim (RGB as a volume)
    alignment: str | None = None  # "realblur-ecc": each result aligned to its target first (RealBlur)

    def __post_init__(self) -> None:
        if self.color_space not in COLOR_SPACES:
            raise ValueError(f"unknown colour space {self.color_space!r}; choose one of {', '.join(COLOR_SPACES)}")
        _check_definition(self.ssim_definition)
        if self.alignment is not None and self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose one of {', '.join(ALIGNMENTS)}")
        if self.alignment and (self.color_space, self.ssim_definition, self.crop_border) != ("rgb", "wang", 0):
            raise ValueError("RealBlur's alignment protocol measures RGB with its own masked SSIM and no border crop: "
                             "drop color_space/ssim_definition/crop_border")

    @property
    def name(self) -> str:
        """Tells protocols apart: two numbers are comparable only under one name (and version)."""
        parts = [self.color_space]
        if self.ssim_definition != "wang":
            parts.append(f"{self.ssim_definition}-ssim")
        if self.alignment:
            parts.append(self.alignment)
        if self.crop_border:
            parts.append(f"crop{self.crop_border}")
        if self.noise_sigma is not None:
            parts.append(f"sigma{self.noise_sigma:g}")
        return "-".join(parts)

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("mrae", "rmse", "psnr") if self.color_space == "spectral" else ("psnr", "ssim")

    def describe(self) -> str:
        if self.color_space == "spectral":
            text = (
                f"MRAE/RMSE/PSNR (peak 1) on float cubes, crop [{SPECTRAL_CROP}:-{SPECTRAL_CROP}] on both axes "
                f"when larger than {2 * SPECTRAL_CROP} px"
            )
        elif self.alignment:
            text = (
                "RealBlur's evaluation: each uint8-quantised result scaled to its target's intensity and aligned to it "
                "by an ECC homography (OpenCV, 100 iterations, Gaussian 5), warped bicubically; PSNR (peak 1) and SSIM "
                f"(Gaussian {SSIM_WINDOW}x{SSIM_WINDOW} sigma {SSIM_SIGMA}, per channel) over the pixels the warp covers; "
                f"PSNR capped at {PSNR_CAP:g} dB"
            )
        else:
            space = "Y (MATLAB rgb2ycbcr on uint8: BT.601, integers 16..235)" if self.color_space == "y" else "RGB"
            if self.ssim_definition == "matlab":
                window = (f"MATLAB ssim: Gaussian sigma {SSIM_SIGMA} over {SSIM_WINDOW} px per axis, the colour axis "
                          f"included (an RGB image is one volume), K1 {SSIM_K1}, K2 {SSIM_K2}, L 255, replicate padding, "
                          "mean of the full map")
            else:  # the text recorded with results since protocol v1: keep it as it is
                window = f"SSIM Gaussian {SSIM_WINDOW}x{SSIM_WINDOW} sigma {SSIM_SIGMA}, K1 {SSIM_K1}, K2 {SSIM_K2}, L 255, valid"
            text = (
                f"PSNR/SSIM on {space} of uint8-quantised images; {window}; PSNR capped at {PSNR_CAP:g} dB; "
                f"border crop {self.crop_border}"
            )
        if self.noise_sigma is not None:
            text += f"; inputs with Gaussian noise sigma {self.noise_sigma:g}/255, seeded per image"
        return text

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "color_space": self.color_space,
            "metrics": list(self.metrics),
            "crop_border": self.crop_border,
            "noise_sigma": self.noise_sigma,
            "ssim_definition": self.ssim_definition,
            "alignment": self.alignment,
            "version": PROTOCOL_VERSION,
            "description": self.describe(),
        }

    def measure(self, pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """Metrics of one HxWxC pair of floats (images in [0, 1], quantised here; or spectral cubes)."""
        if self.color_space == "spectral":
            values = self.measure_batch(_cube_batch(pred), _cube_batch(target))
            return {name: float(value[0]) for name, value in values.items()}
        a, b = quantize(pred), quantize(target)
        if self.alignment:
            return realblur_metrics(a, b)
        options = {"y_channel": self.color_space == "y", "crop_border": self.crop_border}
        return {"psnr": psnr(a, b, **options), "ssim": ssim(a, b, **options, definition=self.ssim_definition)}

    def measure_batch(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image metrics (tensors of shape N) of NCHW batches, for validation during training."""
        if self.color_space == "spectral":
            pred, target = spectral_crop(pred), spectral_crop(target)
            return {"mrae": mrae(pred, target), "rmse": rmse(pred, target), "psnr": spectral_psnr(pred, target)}
        if self.alignment:  # OpenCV's ECC: one image at a time, on the CPU
            import torch

            images = [self.measure(p.permute(1, 2, 0).double().cpu().numpy(), t.permute(1, 2, 0).double().cpu().numpy())
                      for p, t in zip(pred.detach(), target.detach())]
            return {name: torch.tensor([values[name] for values in images], dtype=torch.float64) for name in self.metrics}
        options = {"y_channel": self.color_space == "y", "crop_border": self.crop_border}
        return {"psnr": psnr_batch(pred, target, **options),
                "ssim": ssim_batch(pred, target, **options, definition=self.ssim_definition)}

    def report(self, per_image: dict[str, dict[str, float]]) -> dict:
        """A result record: per-image metrics, their means over the images, and this protocol."""
        mean = {name: float(np.mean([values[name] for values in per_image.values()])) for name in self.metrics}
        return {"protocol": self.as_dict(), "count": len(per_image), "mean": mean, "images": per_image}


def set_metric(metric: str, val_set: str) -> str:
    """The name of a metric on one named validation set: psnr/Rain100L."""
    return f"{metric}/{val_set}"


def over_sets(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Validation metrics of several named sets (set -> metric -> value): each metric per set
    (psnr/Rain100L) and, under its plain name, its mean over the sets, each set weighing the same
    (the papers' "Average" column)."""
    merged = {set_metric(metric, name): value for name, values in per_set.items() for metric, value in values.items()}
    metrics = next(iter(per_set.values()))
    merged.update({metric: float(np.mean([values[metric] for values in per_set.values()])) for metric in metrics})
    return merged
