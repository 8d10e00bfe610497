"""The reproducibility record of a run: what a number needs to be reproduced, logged by one function
(`log_record`) on every run kind: sweeps and their trials, `restorch train` jobs, ablations (sweeps),
evaluations, checkpoint imports and benchmark runs.

Tags (names in orchestrator/tracking/keys.py): the git commit and whether the tree was dirty (the diff
then as the artifact reproducibility/git.diff), the versions of the main packages (every installed
distribution in reproducibility/packages.txt), host, platform, the seed, each dataset's digest, the
device, dtype and thread/GPU count of the process that made the record, which checkpoint the metrics
come from and how speed numbers were timed. The spec as run is the run's spec.yaml (SPEC_ARTIFACT).

Dataset digests are cheap: a local folder's is the digest of its listing (relative path, size and
modification time of every file: the key of the data check's cache, orchestrator/run/data_preflight.py),
not of its bytes; a remote set's is the pinned `data.digests` value; a catalogued benchmark's is its
content digest (workloads/benchmarks.py), logged by the worker that reads it (`log_val_benchmarks`). The dtype
of a trained run is the one its workers trained in (workloads.train.resolved_precision: `auto` resolved on their
device), and its metrics are its last validation's, of the last checkpoint (`reported_checkpoint_tags`).
"""
from __future__ import annotations

import functools
import getpass
import importlib.metadata
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Run, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.tracking.keys import (DATA_DIGEST_PREFIX, DEVICE_TAG, DTYPE_TAG, GIT_COMMIT_TAG, GIT_DIFF_ARTIFACT,
                                        GIT_DIRTY_TAG, GPUS_TAG, HOST_TAG, ITERATION, PACKAGES_ARTIFACT, PLATFORM_TAG,
                                        PROTOCOL_TAG, PROTOCOL_VERSION_TAG, REPORTED_CHECKPOINT_TAG,
                                        REPORTED_ITERATION_TAG, RUN_SEED_TAG, THREADS_TAG, TIMING_TAG, USER_TAG,
                                        VAL_BENCHMARK_PREFIX, VAL_PROTOCOL_PREFIX, VERSION_PREFIX)
from workloads.job_config import JobConfig

VERSIONED_PACKAGES = ("restorch", "torch", "ray", "deepspeed", "mlflow", "optuna")
LISTING_VERSION = "listing-1"
SOURCE = Path(__file__).resolve().parents[2]  # the checkout restorch runs from


def _git(*args: str, strip: bool = True) -> str:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if done.returncode != 0:
        return ""
    return done.stdout.strip() if strip else done.stdout


@functools.cache
def source_state() -> tuple[str, str]:
    """(commit, the uncommitted changes: `git diff HEAD` and the names of untracked files; "" when the tree is
    clean) of the checkout; ("", "") outside git."""
    commit = _git("rev-parse", "HEAD")
    if not commit or not _git("status", "--porcelain"):
        return commit, ""
    untracked = _git("ls-files", "--others", "--exclude-standard")
    listed = "".join(f"# {name}\n" for name in untracked.splitlines())
    return commit, _git("diff", "HEAD", strip=False) + (f"# untracked files (not in the diff above):\n{listed}" if listed else "")


@functools.cache
def installed_packages() -> str:
    """Every installed distribution as name==version lines, sorted."""
    names = {(dist.metadata["Name"] or "?"): dist.version for dist in importlib.metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(names.items(), key=lambda item: item[0].lower()))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_tags() -> dict[str, str]:
    """The process's device and thread/GPU count (the workers log the device they train on themselves)."""
    import torch

    gpus = torch.cuda.device_count()
    device = f"cuda: {torch.cuda.get_device_name(0)}" if gpus else "cpu"
    return {DEVICE_TAG: device, THREADS_TAG: str(torch.get_num_threads()), GPUS_TAG: str(gpus)}


def resources_tags(use_gpu: bool, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, str]:
    """The device tags of a job's Ray Train workers, from its resources (each worker logs its machine too)."""
    return {DEVICE_TAG: f"{workers} worker(s) on {'cuda' if use_gpu else 'cpu'}",
            THREADS_TAG: f"{cpus_per_worker:g} CPU(s) per worker", GPUS_TAG: f"{workers * gpus_per_worker:g}"}


def environment_tags() -> dict[str, str]:
    """Where and with what the process runs: package versions, host, platform, user, git commit and dirtiness."""
    tags = {f"{VERSION_PREFIX}{name}": _version(name) for name in VERSIONED_PACKAGES}
    tags.update({HOST_TAG: socket.gethostname(), PLATFORM_TAG: platform.platform(), USER_TAG: getpass.getuser()})
    commit, diff = source_state()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags[GIT_DIRTY_TAG] = str(bool(diff))
    return tags


def folder_digest(folder: str | Path) -> str:
    """The cheap digest of a local dataset folder: of its listing, as the data check's cache keys it."""
    from orchestrator.run.data_preflight import folder_listing
    from workloads.node_cache import listing_digest

    return f"{LISTING_VERSION}:{listing_digest(folder_listing(Path(folder)), version=LISTING_VERSION)}"


def dataset_digests(folders: Mapping[str, str], pinned: Mapping[str, str] | None = None) -> dict[str, str]:
    """Spec key (data.train, data.val.NAME) -> "digest location": a remote set's pinned digest, a local
    folder's listing digest; "not found" for a folder this machine does not have (a cluster's path)."""
    pinned = pinned or {}
    digests = {}
    for key, location in folders.items():
        if location in pinned:
            digest = pinned[location]
        elif "://" not in location and Path(location).is_dir():
            digest = folder_digest(location)
        else:
            digest = "not found"
        digests[key] = f"{digest} {location}"
    return digests


def log_record(client: MlflowClient, run_id: str, *, seed: int | None = None, datasets: Mapping[str, str] | None = None,
               dtype: str | None = None, checkpoint: str | None = None, timing: str | None = None,
               device: Mapping[str, str] | None = None) -> dict[str, str]:
    """Log the reproducibility record on `run_id` (see the module's docstring) and return its tags.

    datasets: name -> digest; checkpoint: which checkpoint the metrics are of; timing: how the speed numbers
    were measured; device: the device tags (`resources_tags`) of workers that compute elsewhere, by default
    this process's (`device_tags`)."""
    tags = environment_tags()
    tags.update(device_tags() if device is None else device)
    optional = {RUN_SEED_TAG: seed, DTYPE_TAG: dtype, REPORTED_CHECKPOINT_TAG: checkpoint, TIMING_TAG: timing}
    tags.update({key: str(value) for key, value in optional.items() if value is not None})
    tags.update({f"{DATA_DIGEST_PREFIX}{name}": digest for name, digest in (datasets or {}).items()})
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.log_text(run_id, installed_packages(), PACKAGES_ARTIFACT)
    diff = source_state()[1]
    if diff:
        client.log_text(run_id, diff, GIT_DIFF_ARTIFACT)
    return tags


def timing_protocol(settings: Mapping[str, object]) -> str | None:
    """How `restorch bench` timed its numbers (orchestrator/run/benchmarks.py), from its settings; None for a
    benchmark without timed repeats (the sweep benchmark times whole sweeps once)."""
    if "repeats" not in settings:
        return None
    size = settings.get("size") or settings.get("patch")
    batch = settings.get("batch", 1)
    device = settings.get("device", "cpu")
    synchronised = "torch.cuda.synchronize before and after each timed call" if device == "cuda" else "CPU calls are synchronous"
    return (f"synchronised ({synchronised}), warm-up {settings.get('warmup', 0)} round(s), {settings['repeats']} "
            f"timed round(s) interleaved across the variants, median; input {size}x{size}, batch {batch}, on {device}")


def reported_checkpoint_tags(metrics: Mapping[str, object]) -> dict[str, str]:
    """What a trained run's reported metrics are of, from its last validation's `metrics`: the last checkpoint
    (restorch reports and registers the final model; it does not pick a best one), at their iteration."""
    return {REPORTED_CHECKPOINT_TAG: "last", REPORTED_ITERATION_TAG: str(int(metrics[ITERATION]))} if ITERATION in metrics else {}


def reported_checkpoint(run: Run) -> str:
    """Which checkpoint a run's metrics are of: its REPORTED_CHECKPOINT_TAG (and REPORTED_ITERATION_TAG), else
    (a run trained before they were logged) the last one, at its last logged iteration."""
    tags, metrics = run.data.tags, run.data.metrics
    if REPORTED_CHECKPOINT_TAG in tags:
        iteration = tags.get(REPORTED_ITERATION_TAG)
        return tags[REPORTED_CHECKPOINT_TAG] + (f", iteration {iteration}" if iteration else "")
    return f"last, iteration {int(metrics[ITERATION])}" if ITERATION in metrics else "not recorded"


def log_dataset_input(client: MlflowClient, run_id: str, name: str, digest: str, folder: Path, protocol: str, *,
                      context: str) -> None:
    """A dataset a run's metrics are computed on, as an MLflow dataset input: its name (a benchmark's, or the
    folder's), digest (MLflow keeps 36 characters; the whole one is in the run's record tags) and source folder,
    tagged with the metric protocol and the `context` (evaluation, validation)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(folder).resolve())), name=name, digest=digest[:36])
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                            tags=[InputTag("mlflow.data.context", context),
                                                  InputTag("restorch.protocol", protocol)])])


def log_val_benchmarks(client: MlflowClient, run_id: str, config: JobConfig) -> None:
    """The job's validation sets that are catalogued benchmarks, each checked against its entry as this worker
    reads it (a remote set once staged) and recorded on the run: the benchmark and its protocol
    (VAL_BENCHMARK_PREFIX, VAL_PROTOCOL_PREFIX + the set's name), the content digest (DATA_DIGEST_PREFIX + the
    benchmark) and an MLflow dataset input. A folder that does not match raises DatasetError before training."""
    from workloads.benchmarks import check_benchmark
    from workloads.data import DatasetError, local_dataset

    folders, tags = config.data.val_folders, {}
    for name, benchmark in config.data.val_benchmarks.items():
        folder = local_dataset(folders[name], config.data, config.storage.endpoint_url)
        check = check_benchmark(folder, benchmark)
        if check.problems:
            raise DatasetError(f"data.val.{name}: {folder} does not match the benchmark {benchmark}: "
                               + "; ".join(check.problems))
        protocol = check.record(config.task.sigma)["protocol"]
        described = f"{protocol['name']} v{protocol['version']}: {protocol['description']}"
        tags.update({f"{VAL_BENCHMARK_PREFIX}{name}": benchmark, f"{VAL_PROTOCOL_PREFIX}{name}": described,
                     f"{DATA_DIGEST_PREFIX}{benchmark}": check.digest})
        log_dataset_input(client, run_id, benchmark, check.digest, folder, described, context="validation")
    if tags:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def protocol_lines(runs: list[Run]) -> list[str]:
    """The metric protocols of these runs' numbers, from their tags, one line per distinct protocol: the task's
    ("PSNR/SSIM on Y ... — protocol v2"), then each validation set that is a catalogued benchmark, with its
    benchmark's protocol and content digest; "not recorded" for runs without the tags."""
    lines = []
    for run in runs:
        tags = run.data.tags
        line = (f"{tags[PROTOCOL_TAG]} — protocol v{tags.get(PROTOCOL_VERSION_TAG, '?')}" if PROTOCOL_TAG in tags
                else "not recorded with the runs")
        lines.append("; ".join([line, *benchmark_sets(tags)]))
    return sorted(set(lines))


def benchmark_sets(tags: Mapping[str, str]) -> list[str]:
    """A trained run's validation sets that are catalogued benchmarks, from its tags: "NAME: benchmark B, protocol
    y v1: ..., digest D"."""
    return [f"{name}: benchmark {benchmark}, protocol {tags.get(VAL_PROTOCOL_PREFIX + name, '?')}, "
            f"digest {tags.get(DATA_DIGEST_PREFIX + benchmark, 'not recorded')}"
            for key, benchmark in sorted(tags.items()) if key.startswith(VAL_BENCHMARK_PREFIX)
            for name in [key.removeprefix(VAL_BENCHMARK_PREFIX)]]


def describe_record(run: Run, inherited: Mapping[str, str] | None = None, checkpoint: str | None = None,
                    dtype: str | None = None) -> list[str]:
    """The record of a run as lines (the registry card's and the report footer's); `inherited`: the tags of
    the sweep run of a trial, whose record holds what the trial's does not (data digests, resources);
    `checkpoint`, `dtype`: which checkpoints the numbers are of and the dtypes they were trained in, when they
    are not the run's own (an ablation's arms)."""
    tags = {**(inherited or {}), **run.data.tags, **({DTYPE_TAG: dtype} if dtype else {})}
    commit = tags.get(GIT_COMMIT_TAG, "not recorded")
    dirty = " (uncommitted changes: see reproducibility/git.diff)" if tags.get(GIT_DIRTY_TAG) == "True" else ""
    versions = ", ".join(f"{key.removeprefix(VERSION_PREFIX)} {value}" for key, value in sorted(tags.items())
                         if key.startswith(VERSION_PREFIX) and value != "not installed")
    digests = ", ".join(f"{key.removeprefix(DATA_DIGEST_PREFIX)} {value}" for key, value in sorted(tags.items())
                        if key.startswith(DATA_DIGEST_PREFIX))
    seed = tags.get(RUN_SEED_TAG) or run.data.params.get("train.seed", "not recorded")
    machine = ", ".join(f"{label} {tags[key]}" for key, label in
                        ((DEVICE_TAG, "device"), (DTYPE_TAG, "dtype"), (THREADS_TAG, "threads"), (GPUS_TAG, "GPUs"))
                        if key in tags) or "not recorded"
    lines = [f"git commit: {commit}{dirty}", f"packages: {versions or 'not recorded'} (all: {PACKAGES_ARTIFACT})",
             f"seed: {seed}", f"data digests: {digests or 'not recorded'}", f"machine: {machine}",
             f"metrics from checkpoint: {checkpoint or reported_checkpoint(run)}"]
    if TIMING_TAG in tags:
        lines.append(f"timing: {tags[TIMING_TAG]}")
    return lines
