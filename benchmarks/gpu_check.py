"""GPU readiness check (issue 23): CSA- and GLMHA-Restormer training speed on one GPU, and a 1-GPU
DeepSpeed job through Ray Train, in one table, within a time budget.

    bash benchmarks/gpu_check.sh               # on a GPU: at most --budget-s seconds (480)
    bash benchmarks/gpu_check.sh --dry-run     # on the CPU: tiny models, a few steps (tests/test_gpu_check.py)

The first row is the `restorch train` job (a missing Ray or DeepSpeed shows at once): a synthetic
set, one GPU worker, DeepSpeed at the spec's defaults; its model.pt must load without DeepSpeed. Then,
each for both models and in this order (the most wanted first, torch.compile last): patch 256 at
batch 8 in bf16 (autocast) with channels-last tensors; the same with contiguous (NCHW) tensors, and in
fp32; the largest batch that fits at 256; patch 128 at batch 8 and its largest batch; torch.compile at
256, batch 8. Columns:
- images_s, step_ms: one plain PyTorch training step (forward and L1 loss, in autocast for bf16;
  backward; clipping; fused AdamW) on tensors already on the GPU, timed by restorch bench's protocol
  (orchestrator/run/benchmarks.py: synchronised, after warm-up, median of the repeats). fp32 keeps
  PyTorch's defaults: TF32 in convolutions, not in matrix products.
- mfu: 3 x the profiler's forward FLOPs per step (models/profile.py: total MACs x 2, convolutions and
  attention products) / step time / the GPU's dense bf16 peak; against that peak in fp32 rows too.
- peak_mem_gb: torch.cuda.max_memory_allocated over the row's timed steps (on the CPU: the process's
  peak resident memory).
- data_wait: the share of a loader-fed loop's time spent waiting for the next batch and copying it to
  the GPU: the training loader (workloads/data.py) over synthetic pairs (workloads/synth.py), counted
  after its first batch, for up to (loader processes x prefetched batches + 8) steps (data_steps);
  fewer steps than the loader's prefetch can hide a slow loader.
- batch of a "largest" row: doubling from 8, then bisecting, an OOM caught (note: where it stopped).
Every row runs under a time limit; a row that no longer fits in the budget is skipped. The exit status
is 1 when any row failed or was skipped; the rows measured are printed all the same, and written as
CSV to $OUT/gpu_check.csv (after every row) when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from models import build_model
from models.profile import profile_model
from orchestrator.report.results import format_table, format_value, to_csv
from orchestrator.run.benchmarks import SWEEP_TRIAL_MODEL, interleaved_times, medians, peak_bf16_tflops
from workloads.data import PREFETCH_BATCHES, PairedDataset, PatchBatchSampler, PatchSchedule, loader_workers, training_loader
from workloads.synth import write_dataset
from workloads.tasks import get_task
from workloads.train import load_consolidated, peak_memory_mb, task_loss

COLUMNS = ["model", "patch", "batch", "precision", "layout", "compile", "images_s", "step_ms", "mfu", "peak_mem_gb",
           "data_wait", "data_steps", "seconds", "status", "note"]
CSV_NAME = "gpu_check.csv"
TRAIN_ROW = "restorch train (Ray Train, DeepSpeed)"
GRAD_CLIP = 0.01  # Restormer's, as the training recipe


@dataclass(frozen=True)
class Settings:
    """How large and how long: the real check on a GPU, or its dry run on the CPU."""

    device: torch.device
    models: dict[str, dict[str, Any]]
    patches: tuple[int, int]  # the main patch, the small one
    batch: int
    max_batch: int  # the largest-batch search stops here
    probes: int  # steps the largest-batch search may try
    warmup: int
    repeats: int  # at most; fewer where a step is slow (timed_s)
    timed_s: float
    loader_workers: int
    loader_s: float
    compile_backend: str
    limits_s: dict[str, float]  # per kind of row: "fixed", "largest", "compiled", "train"
    budget_s: float
    data_count: int
    data_size: int
    train: dict[str, Any]  # the `restorch train` job's spec sections
    threads: int | None = None  # torch's CPU threads; None: its default


def gpu_settings(budget_s: float) -> Settings:
    return Settings(
        device=torch.device("cuda"),
        models={"csa-restormer": {"name": "restormer", "attention": "csa"},
                "glmha-restormer": {"name": "restormer", "attention": "glmha"}},
        patches=(256, 128), batch=8, max_batch=512, probes=9, warmup=3, repeats=20, timed_s=5.0,
        loader_workers=loader_workers(None, os.cpu_count() or 2), loader_s=6.0, compile_backend="inductor",
        limits_s={"fixed": 60, "largest": 120, "compiled": 180, "train": 200}, budget_s=budget_s,
        data_count=40, data_size=320,
        train={"model": {"name": "restormer", "attention": "csa"},
               "data": {"patch_size": 128, "batch_size": 8, "max_val_images": 2},
               "train": {"iterations": 30, "val_every": 30, "checkpoint_every": 30, "log_every": 10},
               "resources": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": max(1, (os.cpu_count() or 2) - 1)}})


def dry_run_settings(budget_s: float) -> Settings:
    return Settings(
        device=torch.device("cpu"),
        models={"csa-restormer": {**SWEEP_TRIAL_MODEL, "attention": "csa"},
                "glmha-restormer": {**SWEEP_TRIAL_MODEL, "attention": "glmha"}},
        patches=(32, 16), batch=2, max_batch=4, probes=3, warmup=1, repeats=2, timed_s=0.2,
        loader_workers=1, loader_s=0.25, compile_backend="eager",
        limits_s={"fixed": 60, "largest": 60, "compiled": 120, "train": 300}, budget_s=budget_s,
        data_count=6, data_size=48,
        train={"model": SWEEP_TRIAL_MODEL, "data": {"patch_size": 32, "batch_size": 2, "max_val_images": 1},
               "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
               "resources": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}},
        threads=1)  # on a busy CPU two threads of tiny ops wait on each other: steps of seconds instead of 0.1 s


@dataclass(frozen=True)
class Case:
    model: str
    patch: int
    batch: int | None  # None: the largest that fits
    precision: str = "bf16"
    channels_last: bool = True
    compiled: bool = False

    @property
    def kind(self) -> str:
        return "compiled" if self.compiled else "largest" if self.batch is None else "fixed"


def plan(settings: Settings, compile: bool) -> list[Case]:
    """The rows, the most wanted first: what the budget cuts is what matters least."""
    big, small = settings.patches
    models, batch = list(settings.models), settings.batch
    cases = [Case(m, big, batch) for m in models]
    cases += [c for m in models for c in (Case(m, big, batch, channels_last=False), Case(m, big, batch, "fp32"))]
    cases += [Case(m, big, None) for m in models]
    cases += [c for m in models for c in (Case(m, small, batch), Case(m, small, None))]
    cases += [Case(m, big, batch, compiled=True) for m in models] if compile else []
    return cases


class RowTimeout(Exception):
    """A row ran past its time limit (not a RuntimeError: the largest-batch search lets those through)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RowTimeout in this (the main) thread after `seconds`, wherever Python code is running."""
    def expire(signum: int, frame: Any) -> None:
        raise RowTimeout(f"ran past its {seconds:.3g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give the cached blocks of a finished row or a failed try back to the GPU (a no-op on the CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], str | None], start: int, cap: int, probes: int) -> tuple[int, str]:
    """The largest batch in [start, cap] that fits (`fits` returns None, else why not): doubling from
    `start`, then bisecting to within 1/16, at most `probes` tries. Returns it and where the search stopped."""
    good, bad, why, tried, size = None, None, "", 0, start
    while tried < probes:
        tried += 1
        why = fits(size)
        if why is not None:
            bad = size
            break
        good = size
        if size >= cap:
            break
        size = min(2 * size, cap)
    if good is None:
        raise RuntimeError(f"batch {start} does not fit: {why}")
    while bad is not None and bad - good > max(1, good // 16) and tried < probes:
        tried += 1
        middle = (good + bad) // 2
        failed = fits(middle)
        good, bad, why = (middle, bad, why) if failed is None else (good, middle, failed)
    if bad is not None:
        return good, f"largest that fits; batch {bad}: {why}"
    return good, f"largest that fits up to the cap {cap}" if good >= cap else f"largest that fits in {probes} tries"


def random_batch(batch: int, patch: int, case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    layout = torch.channels_last if case.channels_last else torch.contiguous_format
    return tuple(torch.rand(batch, 3, patch, patch, device=device).contiguous(memory_format=layout) for _ in range(2))


def measure(case: Case, settings: Settings, dataset: PairedDataset, peak_tflops: float | None) -> dict[str, Any]:
    """One row: the step's speed, MFU and memory at the case's batch, and the data wait behind it."""
    device, task = settings.device, get_task("deraining")
    torch.manual_seed(0)
    model = build_model(settings.models[case.model]).to(device)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4, fused=True)
    forward = torch.compile(model, backend=settings.compile_backend) if case.compiled else model

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16"):
            loss = task_loss(task, forward(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    def fits(batch: int) -> str | None:
        try:
            step(*random_batch(batch, case.patch, case, device))
            synchronize(device)
            return None
        except RuntimeError as error:  # torch.OutOfMemoryError, and the kernels' limits on large tensors
            return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        finally:
            optimizer.zero_grad(set_to_none=True)
            release_memory(device)

    row: dict[str, Any] = {"note": ""}
    batch = case.batch
    if batch is None:
        batch, row["note"] = largest_batch(fits, settings.batch, settings.max_batch, settings.probes)
    images = random_batch(batch, case.patch, case, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = {case.model: {"step": lambda: step(*images)}}
    first = interleaved_times(runner, device, repeats=1, warmup=settings.warmup)  # sizes the repeats
    repeats = max(1, min(settings.repeats - 1, int(settings.timed_s / first[case.model]["step"][0])))
    times = interleaved_times(runner, device, repeats=repeats, warmup=0)
    times[case.model]["step"] += first[case.model]["step"]
    step_s = medians(times)[case.model]["step"]
    row.update(batch=batch, images_s=batch / step_s, step_ms=1000 * step_s, peak_mem_gb=peak_memory_mb(device) / 1024)
    if peak_tflops:
        forward_flops = 2e9 * profile_model(model, size=case.patch, batch=batch).total_gmacs
        row["mfu"] = 3 * forward_flops / step_s / (peak_tflops * 1e12)
    row["data_wait"], row["data_steps"] = data_wait(step, dataset, case, batch, settings)
    return row


def data_wait(step: Callable[[torch.Tensor, torch.Tensor], None], dataset: PairedDataset, case: Case, batch: int,
              settings: Settings) -> tuple[float, int]:
    """Share of a loader-fed loop's time spent waiting for batches (and their copy to the device),
    after the first batch (the loader processes' start), and the steps it counted."""
    device = settings.device
    layout = torch.channels_last if case.channels_last else torch.contiguous_format
    steps = settings.loader_workers * PREFETCH_BATCHES + 8
    sampler = PatchBatchSampler(len(dataset), PatchSchedule((case.patch,), (batch,), (1,)), total_iterations=steps + 1)
    batches = iter(training_loader(dataset, sampler, settings.loader_workers, device))
    next(batches)
    waited, counted, started = 0.0, 0, time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        item = next(batches)
        inputs, targets = (item[key].to(device, non_blocking=True).contiguous(memory_format=layout)
                           for key in ("input", "target"))
        synchronize(device)
        waited += time.perf_counter() - asked
        step(inputs, targets)
        synchronize(device)
        counted += 1
        if time.perf_counter() - started > settings.loader_s:
            break
    return waited / (time.perf_counter() - started), counted


def case_row(case: Case, settings: Settings) -> dict[str, Any]:
    return {"model": case.model, "patch": case.patch, "batch": case.batch or "largest", "precision": case.precision,
            "layout": "channels_last" if case.channels_last else "nchw",
            "compile": settings.compile_backend if case.compiled else "no"}


def train_job(settings: Settings, folder: Path, data: Path) -> dict[str, Any]:
    """`restorch train` of a tiny synthetic set, one worker (the GPU's), DeepSpeed at the spec's
    defaults (ZeRO-1, bf16 on a GPU); then its model.pt loaded without DeepSpeed and run once."""
    spec = {"name": "gpu-check-train", "model": settings.train["model"], "task": "deraining",
            "data": {"train": str(data / "train"), "val": str(data / "val"), **settings.train["data"]},
            "train": settings.train["train"], "resources": settings.train["resources"],
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "gpu-check"},
            "storage": {"path": str(folder / "runs")}}
    (folder / "train.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # an embedded Ray
    log = folder / "train.log"
    with log.open("w") as output:  # a session of its own: stopped with the processes it started
        job = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "train.yaml"], cwd=folder,
                               env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            job.wait()
        except BaseException:  # the row's time limit
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            raise
    lines = log.read_text(errors="replace").splitlines()
    if job.returncode != 0:
        tail = " | ".join(line.strip() for line in lines[-4:])
        raise RuntimeError(f"`restorch train` exited {job.returncode}: {tail} (log {log})")
    saved = sorted((folder / "runs" / spec["name"]).glob("checkpoint_*/model.pt"))
    if not saved:
        raise RuntimeError(f"`restorch train` wrote no model.pt under {folder / 'runs' / spec['name']}")
    model = load_consolidated(saved[-1])
    with torch.no_grad():
        restored = model(torch.rand(1, 3, 32, 32))
    if not torch.isfinite(restored).all():
        raise RuntimeError(f"{saved[-1]} loads but gives non-finite outputs")
    final = next((line for line in lines if line.startswith("final metrics:")), "")
    peak_mb = final_metric(final, "peak_memory_mb")
    return {"batch": spec["data"]["batch_size"], "patch": spec["data"]["patch_size"], "precision": "auto",
            "images_s": final_metric(final, "images_per_s"), "peak_mem_gb": peak_mb / 1024 if peak_mb else None,
            "note": f"model.pt loaded: {saved[-1]}"}


def final_metric(line: str, key: str) -> float | None:
    """A number from `restorch train`'s `final metrics: {...}` line (a dict's repr: numpy floats as np.float64(x))."""
    found = re.search(rf"'{key}': (?:np\.float\d+\()?([-+.\deE]+|nan|inf)", line)
    return float(found.group(1)) if found else None


class Table:
    """The rows so far: each printed as it comes, and the CSV rewritten at $OUT."""

    def __init__(self, out: str | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.csv = Path(out) / CSV_NAME if out else None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(" | ".join(f"{key}={format_value(row.get(key))}" for key in COLUMNS if row.get(key) not in (None, "")), flush=True)
        if self.csv:
            self.csv.write_text(to_csv(self.rows, COLUMNS))


def timed_row(table: Table, base: dict[str, Any], limit_s: float, run: Callable[[], dict[str, Any]]) -> None:
    """Run one row under its limit; a failure or timeout is the row's status, not the end of the check."""
    started = time.perf_counter()
    try:
        with time_limit(limit_s):
            row = {**base, **run(), "status": "ok"}
    except Exception as error:  # noqa: BLE001 - every failure is a row of the table
        row = {**base, "status": "failed", "note": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    row["seconds"] = time.perf_counter() - started
    table.add(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny models, a few steps")
    parser.add_argument("--budget-s", type=float, help="the whole check's time budget (default 480; dry run 900)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by the GPU's name)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--skip-train", action="store_true", help="leave out the `restorch train` job")
    parser.add_argument("--folder", type=Path, help="where the data, the job and its logs go (default: a new temp folder)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; on a CPU run it with --dry-run", file=sys.stderr)
        return 2
    settings = dry_run_settings(args.budget_s or 900) if args.dry_run else gpu_settings(args.budget_s or 480)
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    peak = args.peak_tflops or (None if args.dry_run else peak_bf16_tflops(device_name))
    print(f"gpu_check: {device_name}; bf16 peak {peak or 'unknown (pass --peak-tflops for MFU)'} TFLOP/s; "
          f"torch {torch.__version__}; budget {settings.budget_s:.0f} s", flush=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick each convolution's fastest kernel once

    folder = args.folder or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = folder / "data"
    write_dataset(data, get_task("deraining"), count=settings.data_count, size=settings.data_size)
    dataset = PairedDataset(data / "train", get_task("deraining"), patch_size=max(settings.patches), cache=folder / "cache")
    table = Table(os.environ.get("OUT"))

    def left_s() -> float:
        return settings.budget_s - (time.monotonic() - started)

    jobs: list[tuple[dict[str, Any], str, Callable[[], dict[str, Any]]]] = []
    if not args.skip_train:  # first: a missing Ray or DeepSpeed shows at once
        jobs.append(({"model": TRAIN_ROW}, "train", lambda: train_job(settings, folder, data)))
    for case in plan(settings, compile=not args.skip_compile):
        jobs.append((case_row(case, settings), case.kind,
                     lambda case=case: measure(case, settings, dataset, peak)))
    for base, kind, run in jobs:
        limit = min(settings.limits_s[kind], left_s())
        if limit < min(settings.limits_s.values()) / 4:
            table.add({**base, "status": "skipped", "note": f"the {settings.budget_s:.0f} s budget is spent"})
            continue
        timed_row(table, base, limit, run)
        release_memory(settings.device)
        if kind == "compiled":
            torch._dynamo.reset()

    print(f"\n{format_table(table.rows, COLUMNS)}")
    if table.csv:
        print(f"gpu_check: wrote {table.csv}")
    failed = [row for row in table.rows if row["status"] != "ok"]
    print(f"gpu_check: {len(table.rows) - len(failed)} of {len(table.rows)} rows ok in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
