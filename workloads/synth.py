"""Small synthetic paired datasets for demos and tests (no dataset can be downloaded here).

Clean images are random crops (random scale, flip and rotation) of the colour photographs that
scikit-image ships; each task degrades them with a simple physical model (see the functions below).
Output is the Restormer layout, split in two: `<out>/train|val/input/NNNN.png` and
`<out>/train|val/target/NNNN.png`. Spectral reconstruction writes the RGB image as the input and a
31-band cube (`.npy`) as the target. Image `i` is drawn from a generator seeded with (seed, i), so
the same arguments always write the same files.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from workloads.files import write_cube, write_image
from workloads.outputs import check_output_folder
from workloads.tasks import Task

PHOTOS: dict[str, Callable[[], np.ndarray]] = {  # colour photographs bundled with scikit-image
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "immunohistochemistry": skimage.data.immunohistochemistry,
}
WAVELENGTHS = np.arange(400, 701, 10)  # nm: the 31 bands of NTIRE 2022 / ARAD_1K


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(load() for load in PHOTOS.values())


def clean_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size crop of a random photograph at a random scale, flipped/rotated at random;
    HxWx3 float32 in [0, 1]."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    smallest = size / min(height, width)  # the scale at which the photo's short side equals size
    scale = rng.uniform(smallest, max(smallest, 1.0))
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    image = np.asarray(Image.fromarray(photo).resize((new_width, new_height), Image.Resampling.BICUBIC))
    top, left = rng.integers(new_height - size + 1), rng.integers(new_width - size + 1)
    image = np.rot90(image[top : top + size, left : left + size], rng.integers(4))
    if rng.integers(2):
        image = image[:, ::-1]
    return np.ascontiguousarray(image, dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------------
# degradations: clean HxWx3 float image in [0, 1] -> degraded image (clipped to [0, 1] when saved)


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Each channel convolved with `kernel` (odd-sized), borders reflected, same size out."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    return fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))


def _splat(points: np.ndarray) -> np.ndarray:
    """A kernel from (N, 2) (y, x) points around 0, each spread bilinearly over its 4 pixels, sum 1."""
    radius = int(np.ceil(np.abs(points).max())) + 1
    kernel = np.zeros((2 * radius + 1, 2 * radius + 1))
    shifted = points + radius
    base = np.floor(shifted).astype(int)
    frac = shifted - base
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            np.add.at(kernel, (base[:, 0] + dy, base[:, 1] + dx), weight)
    return kernel / kernel.sum()


def add_rain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: sparse random drops smeared along one direction (near vertical) by a line
    kernel, slightly blurred, then screen-blended (streaks add light, never darken)."""
    height, width = clean.shape[:2]
    drops = (rng.random((height, width)) < rng.uniform(0.003, 0.012)) * rng.uniform(0.4, 1.0, (height, width))
    length = rng.uniform(0.08, 0.2) * min(height, width)
    angle = math.radians(rng.uniform(-25, 25))
    along = np.linspace(-length / 2, length / 2, max(2, int(4 * length)))
    line = _splat(np.stack([along * math.cos(angle), along * math.sin(angle)], axis=1))
    streaks = fftconvolve(drops, line / line.max(), mode="same")
    streaks = np.clip(gaussian_filter(streaks, rng.uniform(0.3, 0.8)), 0, 1)[..., None]
    return 1 - (1 - clean) * (1 - streaks)


def add_gaussian_noise(clean: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation sigma on the 0..255 scale."""
    return clean + rng.normal(0.0, sigma / 255.0, clean.shape)


def _shot_read_noise(signal: np.ndarray, rng: np.random.Generator, photons: float, read_sigma: float) -> np.ndarray:
    """Sensor noise: Poisson photon counts (`photons` at full scale) plus Gaussian read noise."""
    return rng.poisson(np.clip(signal, 0, 1) * photons) / photons + rng.normal(0.0, read_sigma, signal.shape)


def add_real_noise(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like, signal-dependent noise (shot + read), as in smartphone images such as SIDD's."""
    return _shot_read_noise(clean, rng, photons=rng.uniform(80, 600), read_sigma=rng.uniform(0.004, 0.02))


def add_motion_blur(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: the image convolved with a random trajectory, a path whose heading drifts
    randomly while the shutter is open."""
    steps = 200
    length = rng.uniform(0.05, 0.12) * min(clean.shape[:2])
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.08, steps))
    path = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], axis=1) * length / steps, axis=0)
    return _convolve(clean, _splat(path - path.mean(axis=0)))


def darken(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low light: gamma darkening and a short exposure, then the shot and read noise that dominate
    at few photons."""
    dark = rng.uniform(0.15, 0.4) * clean ** rng.uniform(1.2, 2.0)
    return _shot_read_noise(dark, rng, photons=rng.uniform(300, 1500), read_sigma=rng.uniform(0.002, 0.01))


def add_haze(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t), transmission t = exp(-beta d), with a depth proxy d
    that grows towards the top of the frame plus a smooth random field."""
    height, width = clean.shape[:2]
    field = gaussian_filter(rng.random((height, width)), min(height, width) / 6)
    field = (field - field.min()) / (np.ptp(field) + 1e-12)
    ramp = np.linspace(1, 0, height)[:, None]  # top of the frame is far away
    depth = 0.6 * ramp + 0.4 * field
    transmission = np.exp(-rng.uniform(0.8, 2.0) * depth)[..., None]
    airlight = rng.uniform(0.75, 1.0) + rng.uniform(-0.03, 0.03, 3)  # bright, slightly tinted
    return clean * transmission + airlight * (1 - transmission)


def add_snow(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Snow: three layers of flakes (many small, some medium, few large and near, so blurrier) of
    random opacity, composited over the image."""
    height, width = clean.shape[:2]
    scale = min(height, width) / 128
    cover = np.zeros((height, width))
    for density, radius in ((0.006, 0.6), (0.0015, 1.5), (0.0003, 3.0)):
        flakes = (rng.random((height, width)) < density).astype(float)
        sigma = radius * scale * rng.uniform(0.8, 1.3)
        layer = np.clip(gaussian_filter(flakes, sigma) * 2 * math.pi * sigma**2, 0, 1)  # a lone flake peaks at 1
        cover = 1 - (1 - cover) * (1 - rng.uniform(0.6, 0.95) * layer)
    cover = cover[..., None]
    return clean * (1 - cover) + rng.uniform(0.85, 1.0) * cover


DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "deraining": add_rain,
    "real_denoising": add_real_noise,
    "motion_deblurring": add_motion_blur,
    "low_light": darken,
    "dehazing": add_haze,
    "desnowing": add_snow,
}


# ------------------------------------------------------------------------------------------------
# spectral reconstruction


def _bumps(centres: tuple[float, ...], widths: tuple[float, ...]) -> np.ndarray:
    """Gaussian curves over WAVELENGTHS, one column per (centre, width)."""
    return np.exp(-0.5 * ((WAVELENGTHS[:, None] - np.array(centres)) / np.array(widths)) ** 2)


# Reflectance basis: one smooth spectrum per colour channel (R, G, B), and the camera's responses.
SPECTRAL_BASIS = _bumps((620, 540, 455), (45, 35, 30)).T  # 3 x 31
CAMERA_RESPONSE = _bumps((600, 535, 460), (35, 35, 30))  # 31 x 3
SPECTRAL_FLOOR = 0.02  # real reflectance is never exactly 0 (and MRAE divides by the reference)


def spectral_pair(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A plausible 31-band cube from an RGB image, and the RGB a camera would record of it.

    Each pixel's spectrum is a mix of three smooth bumps weighted by its R, G, B (scaled so white
    peaks at 1, plus a small floor); the input RGB is that cube seen through three Gaussian camera
    responses normalised so white renders as white. Smooth, positive spectra that follow the image,
    enough to exercise the spectral pipeline; not real reflectances.
    """
    basis = SPECTRAL_BASIS / SPECTRAL_BASIS.sum(axis=0).max()
    cube = SPECTRAL_FLOOR + (1 - SPECTRAL_FLOOR) * (clean @ basis)
    white = (SPECTRAL_FLOOR + (1 - SPECTRAL_FLOOR) * basis.sum(axis=0)) @ CAMERA_RESPONSE
    rgb = (cube @ CAMERA_RESPONSE) / white
    return rgb, cube


# ------------------------------------------------------------------------------------------------


def synthesize_pair(task: Task, clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) for `task` from a clean image."""
    if task.name == "spectral_reconstruction":
        return spectral_pair(clean)
    if task.noise_sigma is not None:
        return add_gaussian_noise(clean, rng, task.noise_sigma), clean
    return DEGRADATIONS[task.name](clean, rng), clean


def write_dataset(out: Path, task: Task, *, count: int, size: int, seed: int = 0, val_fraction: float = 0.2) -> dict[str, int]:
    """Write `count` pairs of size x size under `out` (train/ and val/); returns pairs per split."""
    out = Path(out)
    if count < 2:
        raise ValueError(f"count must be at least 2 (one train and one val pair), got {count}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    check_output_folder(out, option="--out", overwrite=None)
    n_val = min(count - 1, max(1, round(count * val_fraction)))
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        source, target = synthesize_pair(task, clean_image(rng, size), rng)
        split = out / ("train" if i < count - n_val else "val")
        (split / "input").mkdir(parents=True, exist_ok=True)
        (split / "target").mkdir(parents=True, exist_ok=True)
        write_image(split / "input" / f"{i:04d}.png", source)
        if target.shape[-1] == 3:
            write_image(split / "target" / f"{i:04d}.png", target)
        else:
            write_cube(split / "target" / f"{i:04d}.npy", target)
    return {"train": count - n_val, "val": n_val}
