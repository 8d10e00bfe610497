"""The deblurring benchmarks' published protocols: MATLAB's `ssim` on RGB (GoPro, HIDE) and RealBlur's
alignment before metrics, each checked against an independent computation of its definition."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import skimage.data
import torch
from conftest import TINY_RESTORMER
from mlflow.tracking import MlflowClient
from scipy.ndimage import affine_transform, convolve, gaussian_filter, shift
from skimage.metrics import structural_similarity

from models.official_weights import official_shapes
from orchestrator.cli import main
from orchestrator.commands.evaluate import evaluate_folders
from orchestrator.tracking.keys import PROTOCOL_TAG
from workloads.alignment import align_to_target
from workloads.benchmarks import BENCHMARKS, REALBLUR_PROTOCOL, Benchmark
from workloads.files import write_image
from workloads.metrics import Protocol, psnr, realblur_metrics, rgb_to_y, ssim, ssim_batch
from workloads.synth import write_dataset
from workloads.tasks import TASKS, get_task

PHOTO = skimage.data.astronaut()[100:260, 150:310]  # 160x160 RGB


def _blurred(image: np.ndarray, sigma: float = 1.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    x = gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0))
    x = x + np.random.default_rng(seed).normal(0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _matlab_ssim_by_3d_convolution(a: np.ndarray, b: np.ndarray) -> float:
    """MATLAB's ssim.m written out: the 11x11x11 kernel exp(-(x^2+y^2+z^2)/(2*1.5^2)) normalised, one full
    3-D convolution with replicate ('nearest') padding, L 255, mean of the full map."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    offsets = np.arange(-5, 6)
    x, y, z = np.meshgrid(offsets, offsets, offsets if a.ndim == 3 else [0], indexing="ij")
    kernel = np.exp(-(x * x + y * y + z * z) / (2 * 1.5**2))
    kernel = (kernel / kernel.sum()).reshape(11, 11, -1) if a.ndim == 3 else (kernel / kernel.sum())[..., 0]

    def blur(v: np.ndarray) -> np.ndarray:
        return convolve(v, kernel, mode="nearest")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    return float((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean())


def _batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255


@pytest.mark.parametrize("noise", [0.0, 8.0])
def test_matlab_ssim_equals_a_literal_3d_convolution(noise: float) -> None:
    target = PHOTO[:64, :80]
    pred = _blurred(target, 1.5, noise)
    expected = _matlab_ssim_by_3d_convolution(pred, target)
    assert ssim(pred, target, definition="matlab") == pytest.approx(expected, abs=1e-10)
    assert ssim_batch(_batch(pred), _batch(target), definition="matlab").item() == pytest.approx(expected, abs=1e-10)
    # a 2-D (Y) image is MATLAB's 2-D case: 11x11 Gaussian, replicate padding
    y_pred, y_target = rgb_to_y(pred), rgb_to_y(target)
    assert ssim(pred, target, y_channel=True, definition="matlab") == pytest.approx(
        _matlab_ssim_by_3d_convolution(y_pred, y_target), abs=1e-10)
    # and it is not the per-channel SSIM the other tasks report
    assert abs(expected - ssim(pred, target)) > 0.01


def test_matlab_ssim_properties() -> None:
    pred = _blurred(PHOTO, 2.0, 4.0)
    assert ssim(PHOTO, PHOTO, definition="matlab") == pytest.approx(1.0, abs=1e-12)
    # the kernel is symmetric along the colour axis: BGR gives the value of RGB
    assert ssim(pred[..., ::-1].copy(), PHOTO[..., ::-1].copy(), definition="matlab") == pytest.approx(
        ssim(pred, PHOTO, definition="matlab"), abs=1e-12)
    # a grey image stored as RGB: filtering along the (constant) colour axis changes nothing, so the volume's
    # SSIM is the grey image's 2-D MATLAB SSIM; inside a 5 px border, the replicate-padded 2-D map is Wang's
    # 'valid' map, so the two definitions differ only by the border
    grey_pred, grey_target = np.repeat(pred[..., 1:2], 3, axis=2), np.repeat(PHOTO[..., 1:2], 3, axis=2)
    assert ssim(grey_pred, grey_target, definition="matlab") == pytest.approx(
        ssim(pred[..., 1], PHOTO[..., 1], definition="matlab"), abs=1e-12)
    assert abs(ssim(grey_pred, grey_target, definition="matlab") - ssim(grey_pred, grey_target)) < 0.02
    # batched: one value per image, each the numpy reference's
    batch = ssim_batch(_batch(pred, grey_pred), _batch(PHOTO, grey_target), definition="matlab")
    assert batch.tolist() == pytest.approx([ssim(pred, PHOTO, definition="matlab"),
                                            ssim(grey_pred, grey_target, definition="matlab")], abs=1e-10)


def _shifted(image: np.ndarray, rows: float, cols: float) -> np.ndarray:
    moved = np.stack([shift(image[..., c].astype(np.float64), (rows, cols), order=3, mode="reflect") for c in range(3)], -1)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


def _warped(image: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = (np.array(image.shape[:2]) - 1) / 2
    offset = centre - matrix @ centre
    moved = np.stack([affine_transform(image[..., c].astype(np.float64), matrix, offset, order=3, mode="reflect")
                      for c in range(3)], -1)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("move", ["subpixel shift", "rotation and zoom"])
def test_realblur_alignment_recovers_a_known_misalignment(move: str) -> None:
    target = PHOTO
    pred = _blurred(target, 1.0)
    moved = _shifted(pred, 0.6, -1.3) if move == "subpixel shift" else _warped(pred, 1.0, 1.02)
    protocol = Protocol("rgb", alignment="realblur-ecc")
    unmoved = psnr(pred, target)
    before = psnr(moved, target)
    after = protocol.measure(moved / 255, target / 255)
    assert after["psnr"] > before + 5, (before, after)  # the misalignment costs several dB without alignment
    assert after["psnr"] == pytest.approx(unmoved, abs=0.3)
    assert after["ssim"] == pytest.approx(ssim(pred, target), abs=0.01)
    # an aligned result: every pixel kept, the plain PSNR up to the intensity matching (a gain of 0.6% here)
    aligned_pred, _, mask = align_to_target(pred.astype(np.float32) / 255, target.astype(np.float32) / 255)
    assert mask.min() == 1
    assert protocol.measure(pred / 255, target / 255)["psnr"] == pytest.approx(unmoved, abs=0.1)
    assert protocol.measure(target / 255, target / 255)["psnr"] > 60


def test_realblur_metrics_follow_the_scripts_skimage_steps() -> None:
    target = PHOTO
    moved = _shifted(_blurred(target, 1.5, 3.0), -0.8, 1.7)
    aligned, reference, mask = align_to_target(moved.astype(np.float32) / 255, target.astype(np.float32) / 255)
    assert mask.min() == 0 and mask.max() == 1  # the shift leaves a band the warp does not cover
    # evaluation_RealBlur_ecc.py: skimage's full SSIM map, masked, 5 px border dropped, masked mean per channel
    _, full = structural_similarity(reference, aligned, channel_axis=-1, gaussian_weights=True,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    inner, inner_mask = (full * mask)[5:-5, 5:-5], mask[5:-5, 5:-5]
    expected_ssim = np.mean(inner.sum(axis=(0, 1)) / inner_mask.sum(axis=(0, 1)))
    expected_psnr = 10 * np.log10(1 / (np.sum((reference - aligned) ** 2, dtype=np.float64) / mask.sum()))
    got = realblur_metrics(moved, target)
    assert got["ssim"] == pytest.approx(expected_ssim, abs=1e-5)  # skimage filters in float32 here
    assert got["psnr"] == pytest.approx(expected_psnr, abs=1e-9)


def test_realblur_batch_and_bad_input() -> None:
    protocol = Protocol("rgb", alignment="realblur-ecc")
    target = PHOTO[:96, :96]
    preds = [_shifted(_blurred(target, 1.0), 0.5, 0.3), _blurred(target, 2.0)]
    batch = protocol.measure_batch(_batch(*preds).float(), _batch(target, target).float())
    for i, pred in enumerate(preds):
        assert batch["psnr"][i].item() == pytest.approx(protocol.measure(pred / 255, target / 255)["psnr"], abs=1e-9)
    with pytest.raises(ValueError, match="black everywhere"):
        protocol.measure(np.zeros((96, 96, 3)), target / 255)
    with pytest.raises(ValueError, match="RGB"):
        realblur_metrics(target[..., 0], target[..., 0])
    with pytest.raises(ValueError, match="no border crop"):
        Protocol("rgb", crop_border=4, alignment="realblur-ecc")
    with pytest.raises(ValueError, match="unknown SSIM definition"):
        Protocol("rgb", ssim_definition="skimage")


def test_protocols_are_named_and_the_deblurring_benchmarks_name_theirs() -> None:
    names = {Protocol("rgb").name, Protocol("y").name, Protocol("rgb", ssim_definition="matlab").name,
             Protocol("rgb", alignment="realblur-ecc").name, Protocol("spectral").name,
             get_task("gaussian_denoising", sigma=15).protocol.name}
    assert names == {"rgb", "y", "rgb-matlab-ssim", "rgb-realblur-ecc", "spectral", "rgb-sigma15"}
    assert TASKS["motion_deblurring"].protocol.name == "rgb-matlab-ssim"
    for name in ("GoPro", "HIDE"):
        assert BENCHMARKS[name].protocol() is TASKS["motion_deblurring"].protocol
    for name in ("RealBlur-J", "RealBlur-R"):
        record = BENCHMARKS[name].protocol().as_dict()
        assert (record["name"], record["alignment"]) == ("rgb-realblur-ecc", "realblur-ecc")
        assert "ECC" in BENCHMARKS[name].describe() and "not comparable" not in BENCHMARKS[name].describe()
    with pytest.raises(ValueError, match="only gaussian_denoising"):
        BENCHMARKS["RealBlur-J"].protocol(25)


def test_evaluate_motion_deblurring_reports_matlab_ssim(tmp_path) -> None:
    (tmp_path / "pred").mkdir()
    (tmp_path / "target").mkdir()
    pred = _blurred(PHOTO, 1.5, 3.0)
    write_image(tmp_path / "target" / "a.png", PHOTO / 255)
    write_image(tmp_path / "pred" / "a.png", pred / 255)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "target", get_task("motion_deblurring"))
    assert result["protocol"]["name"] == "rgb-matlab-ssim"
    assert result["images"]["a"]["ssim"] == pytest.approx(_matlab_ssim_by_3d_convolution(pred, PHOTO), abs=1e-9)
    assert result["images"]["a"]["psnr"] == pytest.approx(psnr(pred, PHOTO), abs=1e-12)


@pytest.mark.slow  # imports a checkpoint into an MLflow store and evaluates it (about 10 s)
def test_evaluate_a_model_on_a_realblur_benchmark_aligns_first(monkeypatch, tmp_path, capsys) -> None:
    tiny = Benchmark("TinyRealBlur", "motion_deblurring", 3, "restormer", "input/ + target/", ("test entry",),
                     metric_protocol=REALBLUR_PROTOCOL)
    monkeypatch.setitem(BENCHMARKS, tiny.name, tiny)
    write_dataset(tmp_path / "synth", get_task("motion_deblurring"), count=4, size=64, val_fraction=0.25)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.01
             for name, shape in official_shapes("restormer", TINY_RESTORMER).items()}
    torch.save({"params": state}, tmp_path / "deblur.pth")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = [f"--set={key}={value}" for key, value in TINY_RESTORMER.items() if key != "name"]
    assert main(["registry", "import", "restormer", str(tmp_path / "deblur.pth"), "--name", "tiny-deblur", "--task",
                 "motion_deblurring", *options, "--tracking-uri", uri]) == 0
    code = main(["evaluate", "--model", "models:/tiny-deblur/1", "--benchmark", tiny.name, "--data",
                 str(tmp_path / "synth" / "train"), "--tracking-uri", uri, "--json", str(tmp_path / "result.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["protocol"]["name"] == "rgb-realblur-ecc" and result["count"] == 3
    assert "ECC" in out
    run = MlflowClient(uri).get_run(re.search(r"logged to MLflow run ([0-9a-f]{32})", out)[1])
    assert "ECC homography" in run.data.tags[PROTOCOL_TAG]
    assert all(np.isfinite(values["psnr"]) and 0 < values["ssim"] <= 1 for values in result["images"].values())
