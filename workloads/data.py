"""Paired restoration datasets in the layouts users already have, checked before training starts.

A dataset folder holds an input folder and a target folder (see `LAYOUTS`) whose files pair up by
name, either directly or in one sub-folder per split (`train/`, `val/`, `Train/`, `Test/`, ...).
Gaussian denoising needs only clean images (a target folder, or images directly in the folder):
its noisy inputs are drawn on the fly.

Every problem a run would hit later (missing or empty folder, unpaired file, pair of different sizes,
unreadable file, wrong channel count, patch larger than an image) is found up front by
`scan_source` and raised together as one `DatasetError` naming each file and the fix.

Training samples are random crops with a random flip/rotation, drawn by `PatchBatchSampler`, which
follows a `PatchSchedule` (Restormer's progressive patch and batch sizes) and seeds every crop, so a
run is reproducible whatever the number of loader workers and can resume at any iteration.

A training job reads its datasets through the node's cache (`load_datasets`): a remote dataset
(s3://...) is staged once per node (workloads/staging.py), every image is decoded once per node into
raw arrays (workloads/decode_cache.py) and crops are cut from their memory maps; `training_loader`
makes the batches in loader processes, ahead of the step.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from workloads.decode_cache import DecodedFiles, UnreadableFile
from workloads.files import DATA_SUFFIXES, array_shape, read_raw, to_float
from workloads.job_config import DataConfig
from workloads.node_cache import cache_root
from workloads.staging import is_uri, stage
from workloads.tasks import Task

MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the files and the fix."""


def _stem(name: str) -> str:
    return Path(name).stem


def _lol_key(name: str) -> str:
    # LOL-v2 real pairs low00001.png with normal00001.png
    return re.sub(r"^(low|normal)", "", _stem(name), flags=re.IGNORECASE)


def _sots_key(name: str) -> str:
    # SOTS hazy names carry the clean image's id first: 0001_0.8_0.2.png -> 0001.png
    return _stem(name).split("_")[0]


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    input_dir: str  # a '*' stands for the split name (ARAD_1K: Train_RGB, Valid_RGB)
    target_dir: str
    input_key: Callable[[str], str] = _stem  # file name -> pairing key
    target_key: Callable[[str], str] = _stem


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout("restormer", "Restormer", "input", "target"),
        Layout("basicsr", "BasicSR", "lq", "gt"),
        Layout("lol_v2", "LOL-v2", "Low", "Normal", _lol_key, _lol_key),
        Layout("lol_v1", "LOL-v1", "low", "high"),
        Layout("sots", "SOTS", "hazy", "gt", _sots_key),
        Layout("arad", "ARAD_1K", "*_RGB", "*_Spec"),
    ]
}
# Gaussian denoising reads only clean images: a layout's target folder, or a plain folder of images.
CLEAN = Layout("clean", "a folder of clean images", "", "")


def _describe(layout: Layout) -> str:
    return layout.description if layout is CLEAN else f"{layout.input_dir}/ + {layout.target_dir}/ ({layout.description})"


LAYOUT_HELP = (
    ", ".join(_describe(layout) for layout in (*LAYOUTS.values(), CLEAN))
    + "; directly in the folder or in one sub-folder per split"
)


@dataclass(frozen=True)
class Source:
    """The input and target folders of one split. Either may be missing (reported by `scan_source`);
    `input_dir` is None for a plain folder of clean images."""

    split: str
    layout: Layout
    root: Path
    input_dir: Path | None
    target_dir: Path

    @property
    def complete(self) -> bool:
        return self.input_dir is not None and self.input_dir.is_dir() and self.target_dir.is_dir()


def _split_of(pattern: str, name: str) -> str | None:
    """The split a folder name stands for under a layout's folder pattern ('' without '*'), or None."""
    if "*" not in pattern:
        return "" if name == pattern else None
    prefix, suffix = pattern.split("*")
    if len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix):
        return name[len(prefix) : len(name) - len(suffix)]
    return None


def _sources_in(folder: Path, split: str) -> list[Source]:
    """Sources directly in `folder`. A layout counts when one of its folders exists; a complete
    layout wins over half of another (BasicSR's gt/ alone could also be SOTS's)."""
    names = sorted(path.name for path in folder.iterdir() if path.is_dir())
    found: dict[str, Source] = {}
    for layout in LAYOUTS.values():
        patterns = (layout.input_dir, layout.target_dir)
        subs = {sub for pattern in patterns for name in names if (sub := _split_of(pattern, name)) is not None}
        for sub in sorted(subs):
            key = "/".join(part for part in (split, sub) if part)
            input_dir, target_dir = (folder / pattern.replace("*", sub) for pattern in patterns)
            source = Source(key, layout, folder, input_dir, target_dir)
            if key not in found or (source.complete and not found[key].complete):
                found[key] = source
    if not found and _data_files(folder):
        found[split] = Source(split, CLEAN, folder, None, folder)
    return list(found.values())


def find_sources(root: Path, task: Task | None = None) -> list[Source]:
    """The dataset splits under `root`: `root` itself, or each of its sub-folders. `task` only
    names its default layout when nothing is found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: check the path, or create a demo set with `restorch data synth`")
    sources = _sources_in(root, "")
    if not sources:
        for sub in sorted(path for path in root.iterdir() if path.is_dir()):
            sources += _sources_in(sub, sub.name)
    if not sources:
        default = f"{task.name} expects {_describe({**LAYOUTS, CLEAN.name: CLEAN}[task.layout])}; " if task else ""
        raise DatasetError(f"no dataset found in {root}: {default}understood layouts: {LAYOUT_HELP}")
    return sources


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DATA_SUFFIXES)


# ------------------------------------------------------------------------------------------------
# checking


@dataclass(frozen=True)
class Pair:
    name: str
    input: Path | None  # None: the input is made from the target on the fly (Gaussian denoising)
    target: Path
    height: int
    width: int


@dataclass
class DatasetScan:
    source: Source
    pairs: list[Pair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    decoded: DecodedFiles | None = None  # the files' raw arrays, when scanned through the node's cache

    def raise_for_problems(self) -> None:
        if not self.problems:
            return
        listed = "\n".join(f"  - {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more (run `restorch data check {self.source.root}` for all)" if more > 0 else ""
        raise DatasetError(f"dataset {self.source.root} has {len(self.problems)} problem(s):\n{listed}{tail}")


def scan_source(source: Source, task: Task, *, patch_size: int | None = None, cache: Path | None = None) -> DatasetScan:
    """Check every file of a split for `task` (and for training crops of `patch_size`). With `cache`
    (the node's cache folder) the files are decoded into it, once, and checked from there."""
    scan = DatasetScan(source)
    if task.noise_sigma is not None:
        if not source.target_dir.is_dir():
            scan.problems.append(
                f"{source.target_dir} is missing: Gaussian denoising reads its clean images from there; add it"
            )
            return scan
        pairs = [(_stem(path.name), None, path) for path in _listed(source.target_dir, scan)]
    else:
        pairs = _paired_files(source, scan)
    shape_of = array_shape
    if cache is not None and pairs:
        files = [path for _, input_path, target_path in pairs for path in (input_path, target_path) if path is not None]
        scan.decoded = DecodedFiles(source.root, files, cache)
        shape_of = scan.decoded.shape
    for name, input_path, target_path in pairs:
        pair = _checked_pair(name, input_path, target_path, task, scan, shape_of)
        if pair is None:
            continue
        scan.pairs.append(pair)
        if patch_size is not None and patch_size > min(pair.height, pair.width):
            scan.problems.append(
                f"{target_path} is {pair.height}x{pair.width}, smaller than the patch size {patch_size}: "
                "lower the patch size (the largest of a progressive schedule counts) or remove the image"
            )
    return scan


def _listed(folder: Path, scan: DatasetScan) -> list[Path]:
    files = _data_files(folder)
    if not files:
        scan.problems.append(f"{folder} holds no images or cubes ({', '.join(DATA_SUFFIXES)}): add the files or fix the path")
    return files


def _paired_files(source: Source, scan: DatasetScan) -> list[tuple[str, Path, Path]]:
    layout = source.layout
    if source.input_dir is None:
        scan.problems.append(
            f"{source.root} holds images but no input and target folders: put the degraded inputs and the clean "
            f"targets in two folders, e.g. {_describe(LAYOUTS['restormer'])}"
        )
        return []
    if not source.complete:
        for side, missing, found in (("input", source.input_dir, source.target_dir), ("target", source.target_dir, source.input_dir)):
            if not missing.is_dir():
                scan.problems.append(
                    f"{missing} is missing (found {found}): put the {side} files there, "
                    f"named like those in {found.name}/ ({layout.description} layout)"
                )
        return []
    inputs, targets = _listed(source.input_dir, scan), _listed(source.target_dir, scan)
    by_key: dict[str, Path] = {}
    for path in targets:
        key = layout.target_key(path.name)
        if key in by_key:
            scan.problems.append(f"{path} and {by_key[key]} pair with the same inputs: keep one of them")
        by_key[key] = path
    pairs, paired_keys = [], set()
    for path in inputs:
        key = layout.input_key(path.name)
        if key not in by_key:
            scan.problems.append(f"{path} has no target in {source.target_dir} (expected a file named {key}.*): add it or remove the input")
            continue
        paired_keys.add(key)
        pairs.append((_stem(path.name), path, by_key[key]))
    for key, path in by_key.items():
        if key not in paired_keys:
            scan.problems.append(f"{path} has no input in {source.input_dir}: add it or remove the target")
    return pairs


def _checked_pair(name: str, input_path: Path | None, target_path: Path, task: Task, scan: DatasetScan,
                  shape_of: Callable[[Path], tuple[int, int, int]]) -> Pair | None:
    shapes = {}
    for path, channels in ((input_path, task.in_channels), (target_path, task.out_channels)):
        if path is None:
            continue
        try:
            shapes[path] = shape_of(path)
        except Exception as err:  # readers raise many types (OSError, SyntaxError, zlib/HDF5 errors...)
            error = str(err) if isinstance(err, UnreadableFile) else f"{type(err).__name__}: {err}"
            scan.problems.append(f"cannot read {path} ({error}): re-export the file or remove the pair")
            continue
        if shapes[path][2] != channels:
            scan.problems.append(f"{path} has {shapes[path][2]} channel(s), {task.name} expects {channels}: convert it or remove the pair")
            del shapes[path]
    if len(shapes) != (1 if input_path is None else 2):
        return None
    (height, width, _), *rest = shapes.values()
    if rest and rest[0][:2] != (height, width):
        scan.problems.append(
            f"{input_path} is {height}x{width} but {target_path} is {rest[0][0]}x{rest[0][1]}: "
            "re-export the pair at the same size (or crop both alike)"
        )
        return None
    return Pair(name, input_path, target_path, height, width)


def check_dataset(root: Path, task: Task, *, patch_size: int | None = None) -> list[DatasetScan]:
    """Scans of every split under `root`."""
    return [scan_source(source, task, patch_size=patch_size) for source in find_sources(root, task)]


def dataset_source(root: Path, task: Task, split: str | None = None) -> Source:
    """The split a job reads from `root`: `split`, or the only one there."""
    sources = {source.split: source for source in find_sources(root, task)}
    if split is None and len(sources) > 1:
        raise DatasetError(f"{root} holds several splits ({', '.join(sources)}): give one split's folder (or split=)")
    if split is not None and split not in sources:
        raise DatasetError(f"{root} has no split {split!r}; it holds: {', '.join(sources) or '(root only)'}")
    return sources[split] if split is not None else next(iter(sources.values()))


def check_job_dataset(root: Path, task: Task, *, patch_size: int | None = None) -> int:
    """Every problem a training job would meet reading `root` as one dataset (as `PairedDataset` does,
    every file decoded), raised as one `DatasetError`; else the number of pairs."""
    scan = scan_source(dataset_source(root, task), task, patch_size=patch_size)
    scan.raise_for_problems()
    return len(scan.pairs)


# ------------------------------------------------------------------------------------------------
# training schedule and sampling


@dataclass(frozen=True)
class PatchSchedule:
    """Patch and batch size by iteration: stage i lasts iterations[i] iterations; after the last
    stage its sizes stay. One stage is a plain fixed-patch schedule."""

    patch_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    iterations: tuple[int, ...]

    def __post_init__(self) -> None:
        lengths = {len(self.patch_sizes), len(self.batch_sizes), len(self.iterations)}
        if len(lengths) != 1 or not self.patch_sizes:
            raise ValueError("patch_sizes, batch_sizes and iterations must be non-empty lists of one length")
        if min(self.patch_sizes + self.batch_sizes + self.iterations) < 1:
            raise ValueError("patch_sizes, batch_sizes and iterations must all be positive")

    @classmethod
    def from_config(cls, config: dict) -> PatchSchedule:
        """From `{patch_sizes: [...], batch_sizes: [...], iterations: [...]}` or
        `{patch_size: P, batch_size: B}` (one stage)."""
        fixed, progressive = ("patch_size", "batch_size"), ("patch_sizes", "batch_sizes", "iterations")
        keys = fixed if any(key in config for key in fixed) else progressive
        missing = [key for key in keys if key not in config]
        if missing:
            raise ValueError(f"patch schedule config lacks {', '.join(missing)}: give {' + '.join(fixed)} or {' + '.join(progressive)}")
        if keys == fixed:
            return cls((int(config["patch_size"]),), (int(config["batch_size"]),), (1,))
        return cls(*(tuple(int(v) for v in config[key]) for key in progressive))

    @property
    def max_patch_size(self) -> int:
        return max(self.patch_sizes)

    def at(self, iteration: int) -> tuple[int, int]:
        """(patch size, batch size) at a 0-based iteration."""
        end = 0
        for patch, batch, length in zip(self.patch_sizes, self.batch_sizes, self.iterations):
            end += length
            if iteration < end:
                return patch, batch
        return self.patch_sizes[-1], self.batch_sizes[-1]


class Sample(NamedTuple):
    """A training crop to draw: which pair, how large, and the seed of its position and flip."""

    index: int
    patch_size: int
    seed: int


class PatchBatchSampler(Sampler[list[Sample]]):
    """Batches of `Sample`s for iterations [start_iteration, total_iterations), sized by the schedule
    (batch sizes are per rank, as in Restormer's recipe). Each iteration draws the samples of all
    `world_size` ranks from a generator seeded with (seed, iteration) and hands this rank its share,
    so ranks see different pairs and resuming at any iteration repeats nothing."""

    def __init__(self, dataset_size: int, schedule: PatchSchedule, *, total_iterations: int, seed: int = 0,
                 start_iteration: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.dataset_size, self.schedule, self.seed = dataset_size, schedule, seed
        self.total_iterations, self.start_iteration = total_iterations, start_iteration
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.total_iterations - self.start_iteration)

    def __iter__(self) -> Iterator[list[Sample]]:
        for iteration in range(self.start_iteration, self.total_iterations):
            patch, batch = self.schedule.at(iteration)
            rng = np.random.default_rng([self.seed, iteration])
            total = batch * self.world_size
            indices = rng.choice(self.dataset_size, size=total, replace=total > self.dataset_size)
            seeds = rng.integers(2**63, size=total)
            mine = slice(self.rank * batch, (self.rank + 1) * batch)
            yield [Sample(int(i), patch, int(s)) for i, s in zip(indices[mine], seeds[mine])]


# ------------------------------------------------------------------------------------------------
# dataset


class PairedDataset(Dataset):
    """Input/target pairs of one split, checked for `task` when built.

    Index with an int for a whole image pair (validation), or with a `Sample` (from
    `PatchBatchSampler`) for a training crop. Items are dicts of CHW float32 tensors `input` and
    `target` and the pair's `name`. Gaussian denoising adds noise of the task's sigma to the clean
    image, unclipped: seeded by the sample in training and by (seed, index) in validation, so every
    evaluation sees the same noise. With `cache` (the node's cache folder) the files are decoded once
    into it and read back by memory map; without, every item decodes its files.
    """

    def __init__(self, root: Path, task: Task, *, split: str | None = None, patch_size: int | None = None,
                 seed: int = 0, cache: Path | None = None) -> None:
        scan = scan_source(dataset_source(root, task, split), task, patch_size=patch_size, cache=cache)
        scan.raise_for_problems()
        self.task, self.pairs, self.seed, self.decoded = task, scan.pairs, seed, scan.decoded

    def __len__(self) -> int:
        return len(self.pairs)

    def _raw(self, path: Path) -> np.ndarray:
        return read_raw(path) if self.decoded is None else self.decoded.array(path)

    def __getitem__(self, item: int | Sample) -> dict:
        pair = self.pairs[item.index if isinstance(item, Sample) else item]
        target = self._raw(pair.target)
        source = target if pair.input is None else self._raw(pair.input)
        if isinstance(item, Sample):
            rng = np.random.default_rng(item.seed)
            source, target = _random_crop(source, target, item.patch_size, rng)
        else:
            rng = np.random.default_rng([self.seed, item])
        if pair.input is None:
            source = to_float(source) + rng.normal(0.0, self.task.noise_sigma / 255.0, source.shape).astype(np.float32)
        return {"input": _to_tensor(source), "target": _to_tensor(target), "name": pair.name}


def _random_crop(source: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random crop and random flip/rotation (one of the 8 symmetries of a square) of both."""
    top = rng.integers(source.shape[0] - size + 1)
    left = rng.integers(source.shape[1] - size + 1)
    turns, flip = rng.integers(4), rng.integers(2)
    out = []
    for array in (source, target):
        array = np.rot90(array[top : top + size, left : left + size], turns)
        out.append(array[:, ::-1] if flip else array)
    return out[0], out[1]


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """An HxWxC array (raw or float) as a CxHxW float32 tensor, converted and laid out in one pass."""
    return torch.from_numpy(to_float(array.transpose(2, 0, 1), order="C"))


# ------------------------------------------------------------------------------------------------
# a training job's datasets and loader


MAX_LOADER_WORKERS = 8
PREFETCH_BATCHES = 4  # per loader worker: batches made ahead of the step


def local_dataset(location: str, data: DataConfig, endpoint_url: str | None) -> Path:
    """The local folder of a dataset of the job's `data` section: the folder itself, or a remote dataset
    (s3://...) staged into the node's cache, checked against the digest the job pinned."""
    if not is_uri(location):
        return Path(location)
    return stage(location, cache=cache_root(data.cache_dir), endpoint_url=endpoint_url, pinned=data.digests.get(location))


def load_datasets(data: DataConfig, task: Task, *, seed: int, endpoint_url: str | None, patch_size: int,
                  val_tasks: dict[str, Task] | None = None) -> tuple[PairedDataset, PairedDataset | dict[str, PairedDataset]]:
    """The training set (checked for crops of `patch_size`) and the validation set, or named sets,
    of the job's `data` section, read through the node's cache. `val_tasks`: a named set's own task
    (a benchmark's protocol), else `task`; a set's metrics follow `dataset.task.protocol`."""
    cache = cache_root(data.cache_dir)
    val_tasks = val_tasks or {}

    def dataset(location: str, task: Task = task, **options: Any) -> PairedDataset:
        return PairedDataset(local_dataset(location, data, endpoint_url), task, seed=seed, cache=cache, **options)

    val = data.val_folders  # a folder, or named sets {name: folder}
    val_sets = ({name: dataset(folder, val_tasks.get(name, task)) for name, folder in val.items()}
                if isinstance(val, dict) else dataset(val))
    return dataset(data.train, patch_size=patch_size), val_sets


def loader_workers(num_workers: int | None, cpus_per_worker: float) -> int:
    """data.num_workers, else one loader process per CPU of the training worker past its own, 1 to 8."""
    if num_workers is not None:
        return num_workers
    return max(1, min(MAX_LOADER_WORKERS, int(cpus_per_worker) - 1))


def training_loader(dataset: PairedDataset, sampler: PatchBatchSampler, workers: int, device: torch.device) -> DataLoader:
    """The batches of `sampler`, made by `workers` loader processes while the step runs; on a GPU they come
    in page-locked memory, so that a copy with non_blocking=True overlaps the step."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=PREFETCH_BATCHES if workers else None)
