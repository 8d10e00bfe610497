"""Datasets: file formats, the layouts users have, checks that fail before training, training sampling."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import png
import pytest
import scipy.io
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from orchestrator.cli import main
from workloads.data import CLEAN, LAYOUTS, DatasetError, PairedDataset, PatchBatchSampler, PatchSchedule, Sample, find_sources
from workloads.files import array_shape, read_cube, read_image
from workloads.tasks import TASKS, get_task

DERAIN = get_task("deraining")
SPECTRAL = get_task("spectral_reconstruction")


def _image(rng: np.random.Generator, height: int = 40, width: int = 48, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def _paired(root: Path, names: list[str], input_dir: str = "input", target_dir: str = "target", size=(40, 48)) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        _save(root / input_dir / name, _image(rng, *size))
        _save(root / target_dir / name, _image(rng, *size))
    return root


# ------------------------------------------------------------------------------------------------
# files


def test_reads_png_8_and_16_bit_jpeg_and_tiff(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb8 = _image(rng)
    np.testing.assert_array_equal(read_image(_save(tmp_path / "rgb8.png", rgb8)), rgb8 / np.float32(255))
    grey8 = _image(rng, channels=1)
    assert read_image(_save(tmp_path / "grey8.png", grey8)).shape == (40, 48, 1)
    rgba = _image(rng, channels=4)
    np.testing.assert_array_equal(read_image(_save(tmp_path / "rgba.png", rgba)), rgba[..., :3] / np.float32(255))

    rgb16 = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    with open(tmp_path / "rgb16.png", "wb") as file:
        png.Writer(48, 40, greyscale=False, bitdepth=16).write(file, rgb16.reshape(40, -1))
    np.testing.assert_allclose(read_image(tmp_path / "rgb16.png"), rgb16 / 65535, atol=1e-7)  # not truncated to 8 bit
    grey16 = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    with open(tmp_path / "grey16.png", "wb") as file:
        png.Writer(48, 40, greyscale=True, bitdepth=16).write(file, grey16)
    np.testing.assert_allclose(read_image(tmp_path / "grey16.png")[..., 0], grey16 / 65535, atol=1e-7)

    smooth = np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], 40, 0).repeat(3, 2)
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "photo.jpg") - smooth / 255).max() < 0.05

    tifffile.imwrite(tmp_path / "a8.tif", rgb8)
    tifffile.imwrite(tmp_path / "a16.tiff", rgb16)
    tifffile.imwrite(tmp_path / "float.tif", rgb16.astype(np.float32) / 65535, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "a8.tif"), rgb8 / np.float32(255))
    np.testing.assert_allclose(read_image(tmp_path / "a16.tiff"), rgb16 / 65535, atol=1e-7)
    np.testing.assert_allclose(read_image(tmp_path / "float.tif"), rgb16 / 65535, atol=1e-7)


def test_reads_cubes_npy_mat_v73_and_older_mat(tmp_path: Path) -> None:
    cube = np.random.default_rng(2).random((12, 10, 31)).astype(np.float32)
    np.save(tmp_path / "c.npy", cube)
    with h5py.File(tmp_path / "v73.mat", "w") as file:  # as MATLAB -v7.3 stores an HxWxB array: reversed axes
        file["cube"] = cube.transpose(2, 1, 0)
        file["bands"] = np.arange(400, 701, 10, dtype=np.float64)[:, None]
        file["norm_factor"] = np.array([[1.0]])
    scipy.io.savemat(tmp_path / "v5.mat", {"rad": cube, "bands": np.arange(31)})  # older format, other name
    for name in ("c.npy", "v73.mat", "v5.mat"):
        np.testing.assert_array_equal(read_cube(tmp_path / name), cube)
        assert array_shape(tmp_path / name) == (12, 10, 31)
    scipy.io.savemat(tmp_path / "two.mat", {"a": cube, "b": cube})
    with pytest.raises(ValueError, match="save it as 'cube'"):
        read_cube(tmp_path / "two.mat")


# ------------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize(
    ("layout", "inputs", "targets", "pairs"),
    [
        ("restormer", {"input": ["a.png", "b.png"]}, {"target": ["a.png", "b.png"]}, {"a": "a", "b": "b"}),
        ("basicsr", {"lq": ["a.png", "b.tif"]}, {"gt": ["a.png", "b.png"]}, {"a": "a", "b": "b"}),
        ("lol_v2", {"Low": ["low00001.png", "low00002.png"]}, {"Normal": ["normal00001.png", "normal00002.png"]},
         {"low00001": "normal00001", "low00002": "normal00002"}),
        ("lol_v1", {"low": ["1.png"]}, {"high": ["1.png"]}, {"1": "1"}),
        ("sots", {"hazy": ["0001_0.8_0.2.png", "0001_0.9_0.16.png", "0002_1_0.2.png"]}, {"gt": ["0001.png", "0002.png"]},
         {"0001_0.8_0.2": "0001", "0001_0.9_0.16": "0001", "0002_1_0.2": "0002"}),
    ],
)
def test_image_layouts_pair_up(tmp_path: Path, layout: str, inputs: dict, targets: dict, pairs: dict) -> None:
    rng = np.random.default_rng(3)
    files = {}
    for folders in (inputs, targets):
        for folder, names in folders.items():
            for name in names:
                files[(folder, Path(name).stem)] = _save(tmp_path / folder / name, _image(rng))
    [source] = find_sources(tmp_path)
    assert source.layout.name == layout
    dataset = PairedDataset(tmp_path, DERAIN)
    (input_folder,), (target_folder,) = inputs, targets
    assert {pair.name: pair.target.stem for pair in dataset.pairs} == pairs
    for i, pair in enumerate(dataset.pairs):
        item = dataset[i]
        expected_input = read_image(files[(input_folder, pair.name)])
        expected_target = read_image(files[(target_folder, pairs[pair.name])])
        np.testing.assert_array_equal(item["input"].numpy(), expected_input.transpose(2, 0, 1))
        np.testing.assert_array_equal(item["target"].numpy(), expected_target.transpose(2, 0, 1))


def test_every_task_names_a_known_default_layout() -> None:
    assert all(task.layout in LAYOUTS or task.layout == CLEAN.name for task in TASKS.values())


def _arad(root: Path, split: str, ids: list[str]) -> None:
    rng = np.random.default_rng(4)
    for i in ids:
        _save(root / f"{split}_RGB" / f"ARAD_1K_{i}.jpg", _image(rng))
        (root / f"{split}_Spec").mkdir(parents=True, exist_ok=True)
        with h5py.File(root / f"{split}_Spec" / f"ARAD_1K_{i}.mat", "w") as file:
            file["cube"] = rng.random((31, 48, 40), dtype=np.float32)  # HxWxB = 40x48x31 as MATLAB v7.3 stores it


def test_arad_layout_with_splits(tmp_path: Path) -> None:
    _arad(tmp_path, "Train", ["0001", "0002"])
    _arad(tmp_path, "Valid", ["0901"])
    assert sorted(source.split for source in find_sources(tmp_path)) == ["Train", "Valid"]
    with pytest.raises(DatasetError, match="several splits"):
        PairedDataset(tmp_path, SPECTRAL)
    train = PairedDataset(tmp_path, SPECTRAL, split="Train")
    assert len(train) == 2
    item = train[1]
    assert item["input"].shape == (3, 40, 48) and item["target"].shape == (31, 40, 48)
    crop = train[Sample(0, 16, seed=5)]
    assert crop["input"].shape == (3, 16, 16) and crop["target"].shape == (31, 16, 16)


def test_splits_in_sub_folders(tmp_path: Path) -> None:
    _paired(tmp_path / "train", ["a.png", "b.png"])
    _paired(tmp_path / "val", ["c.png"], "lq", "gt")
    sources = {source.split: source.layout.name for source in find_sources(tmp_path)}
    assert sources == {"train": "restormer", "val": "basicsr"}
    with pytest.raises(DatasetError, match=r"several splits \(train, val\)"):
        PairedDataset(tmp_path, DERAIN)
    assert [pair.name for pair in PairedDataset(tmp_path, DERAIN, split="val").pairs] == ["c"]
    with pytest.raises(DatasetError, match="no split 'test'"):
        PairedDataset(tmp_path, DERAIN, split="test")


# ------------------------------------------------------------------------------------------------
# Gaussian denoising: noise on the fly


def test_gaussian_denoising_noise_is_seeded_per_image(tmp_path: Path) -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    for name in ("a.png", "b.png"):
        _save(tmp_path / name, grey)  # a plain folder of clean images
    task = get_task("gaussian_denoising", sigma=25)
    dataset = PairedDataset(tmp_path, task)
    first, again, other = dataset[0], dataset[0], dataset[1]
    torch.testing.assert_close(first["input"], again["input"], rtol=0, atol=0)  # validation: same noise every time
    assert not torch.equal(first["input"], other["input"])
    noise = first["input"] - first["target"]
    assert noise.std().item() == pytest.approx(25 / 255, rel=0.1)
    assert first["target"].eq(128 / 255).all()
    assert not torch.equal(PairedDataset(tmp_path, task, seed=1)[0]["input"], first["input"])
    crop = dataset[Sample(1, 32, seed=7)]
    torch.testing.assert_close(crop["input"], dataset[Sample(1, 32, seed=7)]["input"], rtol=0, atol=0)
    assert (crop["input"] - crop["target"]).std().item() == pytest.approx(25 / 255, rel=0.15)


def test_gaussian_denoising_reads_only_targets_of_a_paired_layout(tmp_path: Path) -> None:
    _paired(tmp_path, ["a.png"])
    _save(tmp_path / "input" / "unpaired.png", _image(np.random.default_rng(0)))  # inputs are not used
    dataset = PairedDataset(tmp_path, get_task("gaussian_denoising"))
    assert [(pair.name, pair.input) for pair in dataset.pairs] == [("a", None)]


# ------------------------------------------------------------------------------------------------
# bad input fails before training, naming the file and the fix


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does-not-exist does not exist.*restorch data synth"):
        PairedDataset(tmp_path / "does-not-exist", DERAIN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no dataset found in .*empty: deraining expects input/ \+ target/ \(Restormer\)"):
        PairedDataset(tmp_path / "empty", DERAIN)


def test_missing_target_folder(tmp_path: Path) -> None:
    _save(tmp_path / "input" / "a.png", _image(np.random.default_rng(0)))
    with pytest.raises(DatasetError, match=r"target is missing \(found .*input\): put the target files there"):
        PairedDataset(tmp_path, DERAIN)


def test_empty_folder(tmp_path: Path) -> None:
    _save(tmp_path / "input" / "a.png", _image(np.random.default_rng(0)))
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"target holds no images or cubes .*: add the files or fix the path"):
        PairedDataset(tmp_path, DERAIN)


def test_unpaired_files_both_ways(tmp_path: Path) -> None:
    _paired(tmp_path, ["a.png"])
    _save(tmp_path / "input" / "extra_input.png", _image(np.random.default_rng(0)))
    _save(tmp_path / "target" / "extra_target.png", _image(np.random.default_rng(0)))
    with pytest.raises(DatasetError) as error:
        PairedDataset(tmp_path, DERAIN)
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "input/extra_input.png has no target" in message and "add it or remove the input" in message
    assert "target/extra_target.png has no input" in message and "add it or remove the target" in message


def test_pair_of_different_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save(tmp_path / "input" / "a.png", _image(rng, 40, 48))
    _save(tmp_path / "target" / "a.png", _image(rng, 40, 50))
    with pytest.raises(DatasetError, match=r"input/a.png is 40x48 but .*target/a.png is 40x50: re-export the pair at the same size"):
        PairedDataset(tmp_path, DERAIN)


def test_unreadable_and_truncated_files(tmp_path: Path) -> None:
    _paired(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "input" / "a.png").write_bytes(b"this is not a png")
    data = (tmp_path / "target" / "b.png").read_bytes()
    (tmp_path / "target" / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as error:
        PairedDataset(tmp_path, DERAIN)
    message = str(error.value)
    assert "cannot read" in message and "input/a.png" in message and "target/b.png" in message
    assert "re-export the file or remove the pair" in message and "c.png" not in message


def test_patch_larger_than_an_image(tmp_path: Path) -> None:
    _paired(tmp_path, ["small.png"], size=(40, 48))
    PairedDataset(tmp_path, DERAIN, patch_size=40)
    with pytest.raises(DatasetError, match=r"small.png is 40x48, smaller than the patch size 41: lower the patch size"):
        PairedDataset(tmp_path, DERAIN, patch_size=41)


def test_wrong_channel_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save(tmp_path / "input" / "a.png", _image(rng, channels=1))
    _save(tmp_path / "target" / "a.png", _image(rng))
    with pytest.raises(DatasetError, match=r"input/a.png has 1 channel\(s\), deraining expects 3: convert it"):
        PairedDataset(tmp_path, DERAIN)


def test_data_check_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _paired(tmp_path / "train", ["a.png", "b.png"])
    _paired(tmp_path / "val", ["c.png"])
    assert main(["data", "check", str(tmp_path), "--task", "deraining"]) == 0
    out = capsys.readouterr().out
    assert "train: restormer layout" in out and "2 pairs, sizes 40..40 x 48..48" in out and "ok for deraining" in out
    (tmp_path / "val" / "target" / "c.png").unlink()
    assert main(["data", "check", str(tmp_path), "--task", "deraining"]) == 1
    out = capsys.readouterr().out
    assert "problem:" in out and "val/input/c.png has no target" in out and "val/target holds no images" in out
    assert main(["data", "check", str(tmp_path / "nowhere"), "--task", "deraining"]) == 2


# ------------------------------------------------------------------------------------------------
# training: crops, schedule, sampler


def test_training_crops_are_aligned_seeded_and_augmented(tmp_path: Path) -> None:
    target = _image(np.random.default_rng(0), 40, 48)
    _save(tmp_path / "input" / "a.png", 255 - target)  # input = inverse of target, pixel for pixel
    _save(tmp_path / "target" / "a.png", target)
    dataset = PairedDataset(tmp_path, DERAIN, patch_size=24)
    crops = [dataset[Sample(0, 24, seed)] for seed in range(12)]
    for crop in crops:
        assert crop["input"].shape == crop["target"].shape == (3, 24, 24)
        torch.testing.assert_close(crop["input"], 1 - crop["target"], rtol=0, atol=1e-6)
    torch.testing.assert_close(crops[3]["target"], dataset[Sample(0, 24, 3)]["target"], rtol=0, atol=0)
    # the crops are windows of the image, some flipped or rotated: each equals a window of one of its 8 symmetries
    full = torch.from_numpy(target.astype(np.float32) / 255).permute(2, 0, 1)
    symmetries = [torch.rot90(full.flip(-1) if flip else full, turns, (-2, -1)) for flip in (0, 1) for turns in range(4)]
    used = set()
    for crop in crops:
        for k, image in enumerate(symmetries):
            windows = image.unfold(1, 24, 1).unfold(2, 24, 1)  # C x nH x nW x 24 x 24
            if (windows == crop["target"][:, None, None]).all(dim=(0, 3, 4)).any():
                used.add(k)
                break
        else:
            pytest.fail("a crop is not a window of the image under any flip/rotation")
    assert len(used) >= 3


RESTORMER_SCHEDULE = {"patch_sizes": [128, 160, 192, 256, 320, 384], "batch_sizes": [8, 5, 4, 2, 1, 1],
                      "iterations": [92000, 64000, 48000, 36000, 36000, 24000]}


def test_progressive_patch_schedule() -> None:
    schedule = PatchSchedule.from_config(RESTORMER_SCHEDULE)
    assert schedule.at(0) == (128, 8) and schedule.at(91999) == (128, 8)
    assert schedule.at(92000) == (160, 5) and schedule.at(155999) == (160, 5) and schedule.at(156000) == (192, 4)
    assert schedule.at(299999) == (384, 1) and schedule.at(10**7) == (384, 1)
    assert schedule.max_patch_size == 384
    assert PatchSchedule.from_config({"patch_size": 64, "batch_size": 4}).at(123456) == (64, 4)
    with pytest.raises(ValueError, match="one length"):
        PatchSchedule.from_config({"patch_sizes": [64, 96], "batch_sizes": [4], "iterations": [10, 10]})
    with pytest.raises(ValueError, match="lacks batch_size"):
        PatchSchedule.from_config({"patch_size": 64})
    with pytest.raises(ValueError, match="positive"):
        PatchSchedule.from_config({"patch_sizes": [64], "batch_sizes": [0], "iterations": [10]})


def test_sampler_follows_schedule_reproducibly_and_resumes() -> None:
    schedule = PatchSchedule((16, 24), (4, 2), (3, 2))
    full = list(PatchBatchSampler(10, schedule, total_iterations=7, seed=1))
    assert [(len(batch), batch[0].patch_size) for batch in full] == [(4, 16)] * 3 + [(2, 24)] * 4
    assert full == list(PatchBatchSampler(10, schedule, total_iterations=7, seed=1))
    assert full[4:] == list(PatchBatchSampler(10, schedule, total_iterations=7, seed=1, start_iteration=4))
    assert full != list(PatchBatchSampler(10, schedule, total_iterations=7, seed=2))
    assert all(0 <= sample.index < 10 for batch in full for sample in batch)


def test_sampler_gives_each_rank_its_own_pairs() -> None:
    schedule = PatchSchedule((16,), (3,), (1,))
    ranks = [list(PatchBatchSampler(12, schedule, total_iterations=5, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    for batch0, batch1 in zip(*ranks):
        assert len(batch0) == len(batch1) == 3
        assert not {s.index for s in batch0} & {s.index for s in batch1}
    with pytest.raises(ValueError, match="rank"):
        PatchBatchSampler(12, schedule, total_iterations=5, rank=2, world_size=2)


def test_data_loader_batches_identical_with_and_without_workers(tmp_path: Path) -> None:
    _paired(tmp_path, [f"{i}.png" for i in range(5)])
    dataset = PairedDataset(tmp_path, DERAIN, patch_size=32)
    sampler = PatchBatchSampler(len(dataset), PatchSchedule((16, 32), (3, 2), (2, 2)), total_iterations=4, seed=0)
    serial = list(DataLoader(dataset, batch_sampler=sampler))
    parallel = list(DataLoader(dataset, batch_sampler=sampler, num_workers=2))
    assert [batch["input"].shape for batch in serial] == [(3, 3, 16, 16)] * 2 + [(2, 3, 32, 32)] * 2
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a["input"], b["input"], rtol=0, atol=0)
        assert a["name"] == b["name"]
