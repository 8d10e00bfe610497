"""Synthetic datasets: layout, reproducibility, and degradations that behave like their physics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli import main
from workloads import synth
from workloads.data import PairedDataset
from workloads.files import read_image
from workloads.tasks import TASKS, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_writes_a_checked_restormer_layout(tmp_path: Path, name: str) -> None:
    task = get_task(name)
    assert synth.write_dataset(tmp_path, task, count=5, size=32, seed=3) == {"train": 4, "val": 1}
    suffix = ".npy" if name == "spectral_reconstruction" else ".png"
    assert sorted(p.name for p in (tmp_path / "train" / "input").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert sorted(p.name for p in (tmp_path / "val" / "target").iterdir()) == [f"0004{suffix}"]
    train = PairedDataset(tmp_path, task, split="train", patch_size=32)  # passes every check
    item = train[0]
    assert item["input"].shape == (3, 32, 32) and item["target"].shape == (task.out_channels, 32, 32)
    if task.noise_sigma is None:  # a real degradation, not a copy
        assert not np.allclose(item["input"].numpy()[:3], item["target"].numpy()[:3], atol=1 / 255)


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    task = get_task("desnowing")
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        synth.write_dataset(tmp_path / folder, task, count=3, size=32, seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        synth.write_dataset(tmp_path, get_task("deraining"), count=3, size=32)


def test_clean_images_are_varied_crops_of_photographs() -> None:
    crops = [synth.clean_image(np.random.default_rng([0, i]), 48) for i in range(6)]
    assert all(c.shape == (48, 48, 3) and c.dtype == np.float32 and 0 <= c.min() and c.max() <= 1 for c in crops)
    assert len({c.tobytes() for c in crops}) == 6
    assert all(c.std() > 0.02 for c in crops)  # content, not a flat patch
    assert synth.clean_image(np.random.default_rng(5), 600).shape == (600, 600, 3)  # larger than some photos


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return synth.clean_image(np.random.default_rng(11), 96).astype(np.float64)


def _gradient_energy(image: np.ndarray) -> float:
    return float(np.mean(np.diff(image, axis=0) ** 2) + np.mean(np.diff(image, axis=1) ** 2))


def test_degradations_follow_their_physics(clean: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    rain = synth.add_rain(clean, rng)
    assert (rain >= clean - 1e-9).all() and (rain > clean + 0.05).mean() > 0.005  # streaks only add light
    noisy = synth.add_gaussian_noise(clean, rng, 25)
    assert (noisy - clean).std() == pytest.approx(25 / 255, rel=0.05)
    blurred = synth.add_motion_blur(clean, rng)
    assert blurred.mean() == pytest.approx(clean.mean(), abs=0.02)  # a blur kernel sums to 1
    assert _gradient_energy(blurred) < 0.7 * _gradient_energy(clean)
    dark = synth.darken(clean, rng)
    assert dark.mean() < 0.5 * clean.mean()
    hazy = synth.add_haze(clean, rng)
    assert hazy.std() < clean.std() and hazy.mean() > clean.mean()  # airlight lifts and flattens
    top, bottom = np.abs(hazy - clean)[:20].mean(), np.abs(hazy - clean)[-20:].mean()
    assert top > bottom  # the top of the frame is farther, so hazier
    snowy = synth.add_snow(clean, rng)
    assert (snowy > clean + 0.2).mean() > 0.002  # bright flakes
    real = synth.add_real_noise(clean, rng)
    residual = real - clean
    assert residual[clean.mean(-1) > 0.6].std() > residual[clean.mean(-1) < 0.2].std()  # shot noise grows with signal


def test_spectral_pair_is_smooth_positive_and_white_stays_white() -> None:
    white = np.ones((4, 4, 3))
    rgb, cube = synth.spectral_pair(white)
    np.testing.assert_allclose(rgb, 1.0, atol=1e-12)
    assert cube.shape == (4, 4, 31) and cube.max() == pytest.approx(1.0)
    rgb, cube = synth.spectral_pair(synth.clean_image(np.random.default_rng(1), 32))
    assert cube.min() >= synth.SPECTRAL_FLOOR - 1e-12
    assert np.abs(np.diff(cube, 2, axis=-1)).max() < 0.1  # smooth across wavelength


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rain-mini"
    assert main(["data", "synth", "--task", "gaussian_denoising", "--sigma", "50", "--out", str(out),
                 "--count", "4", "--size", "32"]) == 0
    assert "wrote 3 train + 1 val gaussian_denoising pairs" in capsys.readouterr().out
    noisy, clean = read_image(out / "val" / "input" / "0003.png"), read_image(out / "val" / "target" / "0003.png")
    assert np.std(noisy - clean) > 30 / 255  # sigma 50, partly clipped at 0 and 1 when saved
    assert main(["data", "synth", "--task", "deraining", "--out", str(out)]) == 2  # not empty: clear error, no traceback
    assert "is not empty" in capsys.readouterr().err
