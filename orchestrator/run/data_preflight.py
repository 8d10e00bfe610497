"""A spec's datasets checked before any compute: `restorch train|sweep|ablate|submit` refuse bad data
(unpaired names, an unreadable file, an image smaller than the patch...) with the dataset check's own
message before Ray starts or anything is written, instead of every trial failing in its workers.

Every dataset folder a run reads is checked as its workers will read it (`workloads.data.check_job_dataset`):
data.train and each validation set, in every config the run can make (each ablation variant, each
searched data.* value), the training sets against the largest patch any of those configs crops.
The outcome (the folder's pairs, or its problems) is recorded in the cache under a digest of its
listing (relative path, size and modification time of every entry) and the check's arguments, so a
re-run only lists the folder.

Not checked here: remote datasets (s3://...: staging them would download them; the workers check
their copy) and, for a run on a cluster, folders this machine does not have (they are the nodes' paths).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.spec.checks import check_benchmark_folder
from orchestrator.spec.schema import VARIANT_KEY, DataSpec, ExperimentSpec
from orchestrator.spec.trial import resolve_trial
from workloads.node_cache import cache_root, listing_digest

CHECK_VERSION = "checked-1"  # bump when the dataset check finds more: every folder is then checked anew
RECORDS = "checked"
DATA_CHOOSING_KEYS = ("train", "val", "patch_size", "patch_sizes")  # under data.: what the check depends on


class DataCheckFailed(ValueError):
    """One or more of a spec's datasets that its workers would refuse; the message names each problem."""


def _chooses_data(key: str) -> bool:
    section, _, rest = key.partition(".")
    return key == VARIANT_KEY or (section == "data" and rest.split(".")[0] in DATA_CHOOSING_KEYS)


def _run_configs(spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The configs whose datasets a run reads: one per combination of the values of the searched keys
    that choose data (each ablation variant, each candidate of a data.* entry)."""
    domains = [domain for domain in spec.search_space if _chooses_data(domain.key)]
    base = spec.config()
    combinations = itertools.product(*(domain.candidates() for domain in domains))
    return [resolve_trial(base, dict(zip((domain.key for domain in domains), values))) for values in combinations]


def dataset_uses(spec: ExperimentSpec) -> dict[str, tuple[str, int | None]]:
    """Each dataset location the run reads -> (the spec key naming it, the largest training patch
    cut from it, None for a validation set only)."""
    keys: dict[str, str] = {}
    patches: dict[str, int] = {}
    for config in _run_configs(spec):
        data = DataSpec.model_validate(config["data"])
        schedule = data.schedule_config()
        patch = max(schedule.get("patch_sizes") or [schedule["patch_size"]])
        for key, location in data.folders().items():
            keys.setdefault(location, key)
            if key == "data.train":
                patches[location] = max(patch, patches.get(location, 0))
    return {location: (key, patches.get(location)) for location, key in keys.items()}


def check_spec_data(spec: ExperimentSpec, *, cluster: bool) -> None:
    """Check every dataset of `spec` this machine can see (`cluster`: the run's paths are the
    nodes' own, so only absolute paths found here are checked); `DataCheckFailed` naming every problem."""
    from workloads.staging import is_uri  # pyarrow: not for --help
    from workloads.tasks import get_task

    if spec.ablation is not None and spec.ablation.profile_only:  # trains nothing, reads no data
        return
    task = get_task(spec.task.name, sigma=spec.task.sigma)
    cache = cache_root(None if cluster else spec.data.cache_dir)
    failures: dict[Path, str] = {}
    benchmarks = {f"data.val.{name}": benchmark for name, benchmark in spec.data.val_benchmarks.items()}
    for location, (key, patch_size) in dataset_uses(spec).items():
        folder = Path(location)
        if is_uri(location) or not folder.is_dir() or (cluster and not folder.is_absolute()):
            continue
        try:
            check_folder(folder, task, patch_size=patch_size, cache=cache)
            if key in benchmarks:
                check_benchmark_folder(folder, benchmarks[key])
        except ValueError as error:  # DatasetError: the problems found
            failures[folder] = f"{key}: {error}"
    if failures:
        raise DataCheckFailed("\n".join(failures.values()) + f"\nfix them and run this again (`restorch data check "
                              f"{next(iter(failures))} --task {task.name}` checks a folder alone)")


def check_record(folder: Path, task: Any, *, patch_size: int | None, cache: Path) -> Path:
    """Where the cache keeps the outcome of the check of `folder`, as it is listed now, with these arguments."""
    folder = folder.resolve()
    arguments = f"{CHECK_VERSION}\0{folder}\0{task.name}\0{task.noise_sigma}\0{patch_size}"
    return cache / RECORDS / f"{listing_digest(folder_listing(folder), version=arguments)}.json"


def check_folder(folder: Path, task: Any, *, patch_size: int | None, cache: Path) -> bool:
    """Check `folder` for `task` (a workloads.tasks.Task) and crops of `patch_size`, unless it was
    checked with the same listing before (then its recorded outcome stands); True when the check ran."""
    record = check_record(folder, task, patch_size=patch_size, cache=cache)
    if record.is_file():
        problems = json.loads(record.read_text()).get("problems")
        if problems:
            raise DataCheckFailed(problems)
        return False
    from workloads.data import DatasetError, check_job_dataset

    outcome: dict[str, Any] = {"folder": str(folder.resolve()), "task": task.name, "patch_size": patch_size}
    try:
        outcome["pairs"] = check_job_dataset(folder.resolve(), task, patch_size=patch_size)
    except DatasetError as error:
        outcome["problems"] = str(error)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(outcome))
        partial.rename(record)
    except OSError:  # a read-only or full cache: the check ran, it is only not remembered
        pass
    if "problems" in outcome:
        raise DataCheckFailed(outcome["problems"])
    return True


def folder_listing(folder: Path) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under `folder`; folders as (path/, -1, 0)."""
    for top, folders, files in os.walk(folder, followlinks=True):
        relative = Path(top).relative_to(folder)
        for name in folders:
            yield f"{(relative / name).as_posix()}/", -1, 0
        for name in files:
            try:
                stat = os.stat(Path(top) / name)
            except OSError:  # a broken link: the check reports it
                yield (relative / name).as_posix(), -2, 0
                continue
            yield (relative / name).as_posix(), stat.st_size, stat.st_mtime_ns
