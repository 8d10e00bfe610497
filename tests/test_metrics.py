"""Metrics follow the published protocol: cross-checked against scikit-image, hand-computed values,
and the torch versions against the numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from orchestrator.cli import main
from orchestrator.commands.evaluate import evaluate_folders
from workloads import metrics
from workloads.files import write_cube, write_image
from workloads.metrics import PSNR_CAP, Protocol, psnr, psnr_batch, quantize, rgb_to_y, ssim, ssim_batch
from workloads.tasks import TASKS, get_task


def _degraded(clean: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    x = clean.astype(np.float64)
    if kind == "noise":
        x = x + rng.normal(0, 20, x.shape)
    elif kind == "blur":
        x = gaussian_filter(x, sigma=(2, 2, 0))
    elif kind == "dark":
        x = 0.4 * x + 10
    elif kind == "jpeg-like":  # blocky: 8x8 block means
        h, w = (s - s % 8 for s in x.shape[:2])
        blocks = x[:h, :w].reshape(h // 8, 8, w // 8, 8, -1).mean(axis=(1, 3), keepdims=True)
        x[:h, :w] = np.broadcast_to(blocks, (h // 8, 8, w // 8, 8, x.shape[-1])).reshape(h, w, -1)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


PHOTOS = {"astronaut": skimage.data.astronaut()[100:356, 150:406], "coffee": skimage.data.coffee()[:200, :300],
          "chelsea": skimage.data.chelsea()[50:250, 100:340]}


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("kind", ["noise", "blur", "dark", "jpeg-like"])
def test_rgb_metrics_match_scikit_image(photo: str, kind: str) -> None:
    clean = PHOTOS[photo]
    pred = _degraded(clean, kind, np.random.default_rng(0))
    expected_psnr = peak_signal_noise_ratio(clean, pred, data_range=255)
    expected_ssim = structural_similarity(clean, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=255, channel_axis=-1)
    assert psnr(pred, clean) == pytest.approx(expected_psnr, abs=1e-6)
    assert ssim(pred, clean) == pytest.approx(expected_ssim, abs=1e-6)
    assert 5 < psnr(pred, clean) < 60 and 0.1 < ssim(pred, clean) < 1  # a real degradation, not a trivial case


def test_grey_and_y_channel_metrics_match_scikit_image() -> None:
    clean = PHOTOS["astronaut"]
    pred = _degraded(clean, "noise", np.random.default_rng(1))
    options = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}
    assert ssim(pred[..., 1], clean[..., 1]) == pytest.approx(structural_similarity(pred[..., 1], clean[..., 1], **options), abs=1e-6)
    y_pred, y_clean = rgb_to_y(pred), rgb_to_y(clean)
    assert ssim(pred, clean, y_channel=True) == pytest.approx(structural_similarity(y_pred, y_clean, **options), abs=1e-6)
    assert psnr(pred, clean, y_channel=True) == pytest.approx(peak_signal_noise_ratio(y_clean, y_pred, data_range=255), abs=1e-6)


def test_y_conversion_matches_hand_computed_values() -> None:
    # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, rounded as MATLAB's rgb2ycbcr does for uint8:
    # black 16, white 16 + 219 = 235, red 81.481 -> 81, (100, 150, 200) 136.8794 -> 137, (0, 1, 1) 16.6021 -> 17
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [100, 150, 200], [0, 1, 1]]], dtype=np.uint8)
    assert rgb_to_y(pixels)[0].tolist() == [16.0, 235.0, 81.0, 137.0, 17.0]
    # constant red vs constant black: Y differs by 81 - 16 = 65 everywhere
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    black = np.zeros_like(red)
    assert psnr(red, black, y_channel=True) == pytest.approx(20 * math.log10(255 / 65), abs=1e-9)
    assert psnr(red, black) == pytest.approx(10 * math.log10(255**2 / (255**2 / 3)), abs=1e-9)
    batch = torch.from_numpy(np.stack([red, black])).permute(0, 3, 1, 2).float() / 255
    assert psnr_batch(batch[:1], batch[1:], y_channel=True).item() == pytest.approx(20 * math.log10(255 / 65), abs=1e-9)


def test_identical_images_give_capped_psnr_and_ssim_one() -> None:
    image = PHOTOS["coffee"]
    assert psnr(image, image) == PSNR_CAP == 100.0
    assert psnr(image, image, y_channel=True) == PSNR_CAP
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert psnr_batch(batch, batch).item() == PSNR_CAP
    assert ssim_batch(batch, batch).item() == pytest.approx(1.0, abs=1e-12)


def test_border_crop_equals_metrics_of_the_cropped_images() -> None:
    clean = PHOTOS["chelsea"]
    pred = _degraded(clean, "noise", np.random.default_rng(2))
    assert psnr(pred, clean, crop_border=4) == pytest.approx(psnr(pred[4:-4, 4:-4], clean[4:-4, 4:-4]), abs=1e-12)
    assert ssim(pred, clean, crop_border=4) == pytest.approx(ssim(pred[4:-4, 4:-4], clean[4:-4, 4:-4]), abs=1e-12)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 3])
def test_torch_batch_agrees_with_numpy_reference(y_channel: bool, crop_border: int) -> None:
    rng = np.random.default_rng(3)
    clean = np.stack([PHOTOS["astronaut"][:120, :160], PHOTOS["coffee"][:120, :160], PHOTOS["chelsea"][:120, :160]])
    target = clean.astype(np.float32) / 255
    # float outputs that are not on the uint8 grid, some outside [0, 1]: quantisation is part of the protocol
    pred = (target + rng.normal(0, 0.05, target.shape)).astype(np.float32)
    pred[0, :5] = 1.2
    got_psnr = psnr_batch(torch.from_numpy(pred).permute(0, 3, 1, 2), torch.from_numpy(target).permute(0, 3, 1, 2),
                          y_channel=y_channel, crop_border=crop_border)
    got_ssim = ssim_batch(torch.from_numpy(pred).permute(0, 3, 1, 2), torch.from_numpy(target).permute(0, 3, 1, 2),
                          y_channel=y_channel, crop_border=crop_border)
    for i in range(3):
        options = {"y_channel": y_channel, "crop_border": crop_border}
        assert got_psnr[i].item() == pytest.approx(psnr(quantize(pred[i]), quantize(target[i]), **options), abs=1e-4)
        assert got_ssim[i].item() == pytest.approx(ssim(quantize(pred[i]), quantize(target[i]), **options), abs=1e-6)


def test_quantize_rounds_and_clips_like_saving_a_png() -> None:
    values = np.array([-0.1, 0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 254.6 / 255, 1.0, 1.3])
    assert quantize(values).tolist() == [0, 0, 0, 1, 2, 255, 255, 255]


def test_metrics_reject_unquantised_or_mismatched_input() -> None:
    image = PHOTOS["coffee"]
    with pytest.raises(ValueError, match="quantize"):
        psnr(image.astype(np.float32) / 255, image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shape"):
        ssim(image, image[:-1])
    with pytest.raises(ValueError, match="RGB"):
        psnr(image[..., 0], image[..., 0], y_channel=True)


def test_spectral_metrics_by_hand_and_standard_crop() -> None:
    target = torch.full((1, 31, 8, 8), 0.5, dtype=torch.float64)
    pred = target.clone()
    pred[:, :, :4] = 0.6  # half the values off by 0.1
    assert metrics.mrae(pred, target).item() == pytest.approx(0.5 * 0.1 / 0.5)
    assert metrics.rmse(pred, target).item() == pytest.approx(math.sqrt(0.5 * 0.01))
    assert metrics.spectral_psnr(pred, target).item() == pytest.approx(-10 * math.log10(0.005))

    big_target = np.full((300, 320, 31), 0.5)
    big_pred = big_target.copy()
    big_pred[:128] = 0.9  # only inside the 128-pixel border
    assert Protocol("spectral").measure(big_pred, big_target) == {"mrae": 0.0, "rmse": 0.0, "psnr": PSNR_CAP}
    small_pred = big_pred[:200, :200]  # too small for the crop: evaluated whole
    assert Protocol("spectral").measure(small_pred, big_target[:200, :200])["mrae"] > 0


def test_tasks_carry_the_published_protocols() -> None:
    assert set(TASKS) == {"deraining", "gaussian_denoising", "real_denoising", "motion_deblurring", "low_light",
                          "dehazing", "desnowing", "spectral_reconstruction"}
    assert TASKS["deraining"].protocol.color_space == "y"
    assert all(TASKS[name].protocol.color_space == "rgb" for name in TASKS if name not in ("deraining", "spectral_reconstruction"))
    spectral = TASKS["spectral_reconstruction"]
    assert (spectral.loss, spectral.out_channels, spectral.protocol.metrics) == ("mrae", 31, ("mrae", "rmse", "psnr"))
    assert all(task.loss == "l1" for name, task in TASKS.items() if name != "spectral_reconstruction")
    assert get_task("gaussian_denoising", sigma=50).protocol.as_dict()["noise_sigma"] == 50
    assert "sigma 50" in get_task("gaussian_denoising", sigma=50).protocol.describe()
    with pytest.raises(ValueError, match="only gaussian_denoising"):
        get_task("deraining", sigma=15)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("deblurring")


def test_evaluate_records_per_image_means_and_protocol(tmp_path, capsys) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "pred").mkdir()
    (tmp_path / "target").mkdir()
    expected = []
    for name in ("a", "b"):
        clean = PHOTOS["astronaut"][:64, :64]
        pred = _degraded(clean, "noise", rng)
        write_image(tmp_path / "target" / f"{name}.png", clean / 255)
        write_image(tmp_path / "pred" / f"{name}.png", pred / 255)
        expected.append(psnr(pred, clean, y_channel=True))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "target", get_task("deraining"))
    assert result["images"]["a"]["psnr"] == pytest.approx(expected[0], abs=1e-9)
    assert result["mean"]["psnr"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert result["protocol"]["color_space"] == "y" and result["task"] == "deraining"

    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"),
                 "--task", "deraining", "--json", str(tmp_path / "result.json")]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and "protocol: PSNR/SSIM on Y" in out
    assert '"protocol"' in (tmp_path / "result.json").read_text()

    (tmp_path / "pred" / "b.png").unlink()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"), "--task", "deraining"]) == 2
    assert "b.png" in capsys.readouterr().err


def test_evaluate_spectral_cubes(tmp_path) -> None:
    (tmp_path / "pred").mkdir()
    (tmp_path / "target").mkdir()
    cube = np.random.default_rng(5).uniform(0.1, 1, (40, 40, 31))
    write_cube(tmp_path / "target" / "x.npy", cube)
    write_cube(tmp_path / "pred" / "x.npy", cube * 1.1)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "target", get_task("spectral_reconstruction"))
    assert result["mean"]["mrae"] == pytest.approx(0.1, abs=1e-6)
