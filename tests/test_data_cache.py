"""The node's dataset cache: images decoded once into memory-mapped raw arrays (hit, miss, a new entry
when the data changes, one decode for two processes), crops identical to decoding every time, the
training loader, and remote datasets staged from S3 (moto) once per node and pinned for a run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import png
import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from orchestrator.spec.schema import DataSpec, SpecError
from servers import S3_ENV
from test_storage import BUCKET, s3, s3_endpoint  # noqa: F401 (moto's S3 and a bucket: fixtures shared with the storage tests)
from workloads.data import (DatasetError, PairedDataset, PatchBatchSampler, PatchSchedule, Sample, load_datasets,
                            loader_workers, training_loader)
from workloads.job_config import DataConfig
from workloads.node_cache import locked
from workloads.staging import DatasetChanged, list_remote, stage
from workloads.synth import write_dataset
from workloads.tasks import get_task

DERAIN = get_task("deraining")


def _rain(root: Path, count: int = 6, size: int = 40) -> Path:
    write_dataset(root, DERAIN, count=count, size=size, seed=0)
    return root


def _same_items(a: PairedDataset, b: PairedDataset, samples: list[Sample | int]) -> None:
    for sample in samples:
        x, y = a[sample], b[sample]
        for key in ("input", "target"):
            assert x[key].is_contiguous() and x[key].dtype == torch.float32
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# decode cache


def test_cache_hit_miss_and_a_new_entry_when_the_data_changes(tmp_path: Path) -> None:
    root, cache = _rain(tmp_path / "rain") / "train", tmp_path / "cache"
    first = PairedDataset(root, DERAIN, patch_size=16, cache=cache)
    assert first.decoded.built and sorted(p.suffix for p in first.decoded.folder.iterdir()) == [".json"] + [".npy"] * 10
    again = PairedDataset(root, DERAIN, patch_size=16, cache=cache)
    assert not again.decoded.built and again.decoded.folder == first.decoded.folder
    assert not list(cache.glob("decoded/.*"))  # no building folder left behind

    image = np.asarray(Image.open(root / "target" / "0000.png"))
    Image.fromarray(255 - image).save(root / "target" / "0000.png")  # the same name, new content
    changed = PairedDataset(root, DERAIN, patch_size=16, cache=cache)
    assert changed.decoded.built and changed.decoded.folder != first.decoded.folder
    torch.testing.assert_close(changed[0]["target"], 1 - first[0]["target"], rtol=0, atol=1e-6)
    assert not torch.equal(changed[0]["target"], first[0]["target"])  # the old entry is not used

    (root / "input" / "0001.png").unlink(), (root / "target" / "0001.png").unlink()
    fewer = PairedDataset(root, DERAIN, patch_size=16, cache=cache)
    assert fewer.decoded.built and len(fewer) == len(first) - 1


def _png16(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        png.Writer(image.shape[1], image.shape[0], greyscale=False, bitdepth=16).write(file, image.reshape(image.shape[0], -1))


def _formats(root: Path) -> dict[str, tuple[Path, object]]:
    """Datasets of every kind of file the tasks read: 8-bit PNG, 16-bit PNG, an RGB + spectral cube
    (.mat v7.3 and .npy) set, and a folder of clean images for Gaussian denoising."""
    rng = np.random.default_rng(3)
    write_dataset(root / "rain", DERAIN, count=4, size=40, seed=1)
    for folder in ("arad/Train_RGB", "arad/Train_Spec", "clean"):
        (root / folder).mkdir(parents=True)
    for name in ("a", "b", "c"):
        _png16(root / "png16" / "input" / f"{name}.png", rng.integers(0, 65536, (36, 44, 3), dtype=np.uint16))
        _png16(root / "png16" / "target" / f"{name}.png", rng.integers(0, 65536, (36, 44, 3), dtype=np.uint16))
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "arad" / "Train_RGB" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "clean" / f"{name}.png")
    for name in ("a", "b"):
        with h5py.File(root / "arad" / "Train_Spec" / f"{name}.mat", "w") as file:
            file["cube"] = rng.random((31, 48, 40), dtype=np.float32)  # MATLAB v7.3: axes reversed
    np.save(root / "arad" / "Train_Spec" / "c.npy", rng.random((40, 48, 31), dtype=np.float32))
    return {"rain": (root / "rain" / "train", DERAIN), "png16": (root / "png16", DERAIN),
            "arad": (root / "arad", get_task("spectral_reconstruction")),
            "clean": (root / "clean", get_task("gaussian_denoising", sigma=25))}


def test_cached_crops_and_images_equal_decoding_every_time(tmp_path: Path) -> None:
    for label, (root, task) in _formats(tmp_path).items():
        direct = PairedDataset(root, task, patch_size=24, seed=3)
        cached = PairedDataset(root, task, patch_size=24, seed=3, cache=tmp_path / "cache")
        assert cached.decoded.built and direct.decoded is None, label
        _same_items(direct, cached, [Sample(i % len(direct), size, seed) for i, (size, seed) in
                                     enumerate([(24, 0), (16, 1), (24, 2), (8, 3), (24, 4), (16, 5)])])
        _same_items(direct, cached, list(range(len(direct))))  # whole images (validation)
    kept = {array.dtype for array in map(np.load, (tmp_path / "cache").glob("decoded/*/*.npy"))}
    assert kept == {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}  # each file in its own dtype


def test_unreadable_file_is_reported_from_the_cache_too(tmp_path: Path) -> None:
    root = _rain(tmp_path / "rain") / "train"
    (root / "input" / "0002.png").write_bytes((root / "input" / "0002.png").read_bytes()[:200])  # truncated
    for attempt in range(2):  # the decode, then the cache's record of it
        with pytest.raises(DatasetError, match=r"cannot read .*0002\.png \((OSError|SyntaxError|ValueError)"):
            PairedDataset(root, DERAIN, cache=tmp_path / "cache")


def _waiting_on(lock: Path) -> int:
    """Processes blocked on the flock of `lock` (Linux lists them in /proc/locks with '->')."""
    inode = f":{os.stat(lock).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


DECODE_SCRIPT = """
import sys
from pathlib import Path
from workloads.data import PairedDataset
from workloads.tasks import get_task
dataset = PairedDataset(Path(sys.argv[1]), get_task("deraining"), cache=Path(sys.argv[2]))
print("built" if dataset.decoded.built else "reused", dataset.decoded.folder.name)
"""


def test_two_processes_of_a_node_decode_once(tmp_path: Path) -> None:
    root = _rain(tmp_path / "rain") / "train"
    name = PairedDataset(root, DERAIN, cache=tmp_path / "elsewhere").decoded.folder.name  # the entry's digest
    cache = tmp_path / "cache"
    lock = cache / "decoded" / f"{name}.lock"
    with locked(lock):  # both processes find no entry and queue on the lock
        workers = [subprocess.Popen([sys.executable, "-c", DECODE_SCRIPT, str(root), str(cache)], stdout=subprocess.PIPE,
                                    text=True, cwd=Path(__file__).parents[1]) for _ in range(2)]
        deadline = time.monotonic() + 120
        while _waiting_on(lock) < 2:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "the processes did not queue"
            time.sleep(0.1)
    outputs = sorted(worker.communicate(timeout=120)[0].split()[0] for worker in workers)
    assert outputs == ["built", "reused"]
    assert [p.name for p in (cache / "decoded").iterdir() if p.is_dir()] == [name]


# ------------------------------------------------------------------------------------------------
# loader


def test_training_loader_batches_equal_the_uncached_serial_ones(tmp_path: Path) -> None:
    root = _rain(tmp_path / "rain", count=8) / "train"
    schedule = PatchSchedule((16, 24), (3, 2), (2, 2))
    direct = PairedDataset(root, DERAIN, patch_size=24)
    cached = PairedDataset(root, DERAIN, patch_size=24, cache=tmp_path / "cache")
    serial = list(training_loader(direct, PatchBatchSampler(len(direct), schedule, total_iterations=4, seed=1),
                                  0, torch.device("cpu")))
    for start in (0, 2):  # a resumed run gets the batches from there on
        sampler = PatchBatchSampler(len(cached), schedule, total_iterations=4, seed=1, start_iteration=start)
        batches = list(training_loader(cached, sampler, 2, torch.device("cpu")))
        assert len(batches) == 4 - start
        for a, b in zip(serial[start:], batches):
            torch.testing.assert_close(a["input"], b["input"], rtol=0, atol=0)
            torch.testing.assert_close(a["target"], b["target"], rtol=0, atol=0)
    assert loader_workers(None, cpus_per_worker=1) == 1
    assert loader_workers(None, cpus_per_worker=6) == 5
    assert loader_workers(None, cpus_per_worker=32) == 8
    assert loader_workers(0, cpus_per_worker=6) == 0


# ------------------------------------------------------------------------------------------------
# remote datasets


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_s3_dataset_is_staged_once_and_anew_when_it_changes(s3, s3_endpoint, tmp_path: Path) -> None:
    local = _rain(tmp_path / "rain")
    upload(s3, local, "rain")
    uri, cache = f"s3://{BUCKET}/rain/train", tmp_path / "cache"
    digest = list_remote(uri, s3_endpoint).digest
    staged = stage(uri, cache=cache, endpoint_url=s3_endpoint)
    assert staged == cache / "staged" / digest
    assert sorted(p.relative_to(staged) for p in staged.rglob("*.png")) == sorted(
        p.relative_to(local / "train") for p in (local / "train").rglob("*.png"))
    assert (staged / "input" / "0000.png").read_bytes() == (local / "train" / "input" / "0000.png").read_bytes()
    (staged / "marker").touch()
    assert stage(uri, cache=cache, endpoint_url=s3_endpoint) == staged and (staged / "marker").exists()  # not again

    s3.put_object(Bucket=BUCKET, Key="rain/train/target/0000.png", Body=(local / "val/target/0005.png").read_bytes())
    new = list_remote(uri, s3_endpoint).digest
    assert new != digest
    assert stage(uri, cache=cache, endpoint_url=s3_endpoint) == cache / "staged" / new
    # A run pinned the old digest: a node holding that copy goes on with it; another node stops, naming both digests.
    assert stage(uri, cache=cache, endpoint_url=s3_endpoint, pinned=digest) == staged
    with pytest.raises(DatasetChanged, match=f"pinned as {digest} and is now {new}"):
        stage(uri, cache=tmp_path / "other-node", endpoint_url=s3_endpoint, pinned=digest)


def _job_data(data: DataSpec, cache: Path) -> DataConfig:
    """`data` as a job's config carries it to the workers (orchestrator/run/jobs.job_config), with the node cache `cache`."""
    return DataConfig(**data.model_copy(update={"cache_dir": str(cache)}).model_dump(mode="json"),
                      schedule=data.schedule_config())


def test_job_datasets_from_s3_pinned_when_the_run_starts(s3, s3_endpoint, tmp_path: Path) -> None:
    upload(s3, _rain(tmp_path / "rain"), "rain")
    data = DataSpec(train=f"s3://{BUCKET}/rain/train", val={"A": f"s3://{BUCKET}/rain/val", "B": str(tmp_path / "rain/val")})
    pinned = data.resolved(s3_endpoint)
    assert set(pinned.digests) == {f"s3://{BUCKET}/rain/train", f"s3://{BUCKET}/rain/val"}
    assert pinned.train == data.train and pinned.val["B"] == str(tmp_path / "rain/val")
    on_node = _job_data(pinned, tmp_path / "cache")
    train_set, val_sets = load_datasets(on_node, DERAIN, seed=0, endpoint_url=s3_endpoint, patch_size=16)
    assert len(train_set) == 5 and len(val_sets["A"]) == len(val_sets["B"]) == 1
    _same_items(val_sets["A"], val_sets["B"], [0])
    assert pinned.resolved(s3_endpoint).digests == pinned.digests  # pinned once, not again (a sweep's trials)

    s3.delete_object(Bucket=BUCKET, Key="rain/train/input/0000.png")  # the dataset changes mid-run
    on_node = _job_data(pinned, tmp_path / "another-node")
    with pytest.raises(DatasetChanged, match=f"s3://{BUCKET}/rain/train changed since this run started"):
        load_datasets(on_node, DERAIN, seed=0, endpoint_url=s3_endpoint, patch_size=16)


def test_unreachable_bucket_or_prefix_is_refused_before_anything_runs(s3, s3_endpoint, tmp_path: Path, capsys) -> None:
    upload(s3, _rain(tmp_path / "rain"), "rain")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: s3-data
model: {{name: restormer, dim: 8, num_blocks: [1, 1, 1, 1], num_refinement_blocks: 1, heads: [1, 1, 1, 1]}}
task: deraining
data: {{train: s3://no-such-bucket/rain/train, val: s3://{BUCKET}/rain/nothing-here, patch_size: 16, batch_size: 2}}
storage: {{path: {tmp_path / 'runs'}, endpoint_url: {s3_endpoint}}}
""")
    assert main(["train", str(spec)]) == 2
    error = capsys.readouterr().err
    assert "data.train: cannot list s3://no-such-bucket/rain/train" in error and "does not exist" in error
    assert "storage.endpoint_url" in error and not (tmp_path / "runs").exists()
    spec.write_text(spec.read_text().replace("s3://no-such-bucket", f"s3://{BUCKET}"))
    assert main(["train", str(spec)]) == 2
    assert f"data.val: cannot list s3://{BUCKET}/rain/nothing-here" in capsys.readouterr().err
    with pytest.raises(SpecError, match="data.train: cannot list .*Could not connect"):
        DataSpec(train=f"s3://{BUCKET}/rain/train", val="x").check_folders("http://127.0.0.1:1")


@pytest.mark.slow
def test_restorch_train_on_s3_data_stages_it_once_per_node(s3, s3_endpoint, tmp_path: Path) -> None:
    """Two training workers of one node: the datasets are staged and decoded once, and train."""
    upload(s3, _rain(tmp_path / "rain", count=8, size=48), "rain")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: s3-data
model: {{name: restormer, dim: 8, num_blocks: [1, 1, 1, 1], num_refinement_blocks: 1, heads: [1, 1, 1, 1]}}
task: deraining
data: {{train: s3://{BUCKET}/rain/train, val: s3://{BUCKET}/rain/val, patch_size: 32, batch_size: 2}}
train: {{iterations: 2, val_every: 2, checkpoint_every: 2, log_every: 1, max_failures: 0}}
deepspeed: {{precision: fp32}}
resources: {{num_workers: 2, cpus_per_worker: 1}}
storage: {{path: {tmp_path / 'runs'}, endpoint_url: {s3_endpoint}}}
tracking: {{uri: sqlite:///{tmp_path / 'mlflow.db'}}}
""")
    cache = tmp_path / "node-cache"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "restorch"), "train", str(spec)], cwd=tmp_path,
                          env={**env, **S3_ENV, "RESTORCH_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "iter 2/2" in done.stdout
    digests = {list_remote(f"s3://{BUCKET}/rain/{split}", s3_endpoint).digest for split in ("train", "val")}
    assert {p.name for p in (cache / "staged").iterdir() if p.is_dir()} == digests  # once per dataset, not per rank
    assert len([p for p in (cache / "decoded").iterdir() if p.is_dir()]) == 2
