"""`restorch bench`: speed of the models and of the training engine, as ratios measured in one run.

Every figure that is compared is measured interleaved (each variant once per round, median over the
rounds after warm-up) so that machine noise spreads evenly, and each result can be logged to MLflow
as a `benchmark` run with its table as artifacts.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from models import build_model, list_models
from models.attention import ATTENTIONS
from models.profile import activation_bytes, profile_model
from orchestrator.report.results import format_table, to_csv
from orchestrator.run.jobs import job_config
from orchestrator.run.timeline import PHASES, TIMELINE_ENV, first_reached
from orchestrator.spec.load import load_spec, parse_spec
from orchestrator.spec.trial import resolve_trial
from workloads.session import LocalSession
from workloads.tasks import get_task

BASELINE = "restormer"  # CSA-Restormer: every ratio is to it
BENCHMARK_EXPERIMENT = "restorch-benchmarks"
# Dense bf16 peak FLOP/s of the GPUs we know, for MFU (or pass --peak-tflops).
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in this order against
# torch.cuda.get_device_name() (the more specific names first). NVIDIA's datasheets give the sparse
# figure; the dense one is half of it: H100 SXM 1,979 -> 989, H100 PCIe 1,513 -> 756, H100 NVL
# 1,671 -> 835 ("NVIDIA H100 Tensor Core GPU" datasheet); H200 SXM 1,979 -> 989, H200 NVL 1,671 -> 835
# ("NVIDIA H200 Tensor Core GPU" datasheet); GH200 as the H100 SXM ("NVIDIA GH200 Grace Hopper
# Superchip" datasheet); A100 312 dense ("NVIDIA A100 Tensor Core GPU" datasheet); L40S 733 -> 362,
# L40 362 -> 181, L4 242 -> 121 (the L40S, L40 and L4 datasheets); B200 4,500 -> 2,250 ("NVIDIA
# DGX B200" datasheet, per GPU).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0),
                    ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_variants() -> dict[str, dict[str, Any]]:
    """Every registered model at its defaults, and Restormer with each other channel attention."""
    variants = {name: {"name": name} for name in list_models()}
    variants.update({f"restormer+{a}": {"name": "restormer", "attention": a} for a in ATTENTIONS if a != "csa"})
    return variants


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def interleaved_times(runners: dict[str, dict[str, Callable[[], Any]]], device: torch.device, repeats: int,
                      warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each runner of each variant in each round; every runner runs once per round."""
    seconds: dict[str, dict[str, list[float]]] = {v: {k: [] for k in kinds} for v, kinds in runners.items()}
    for round_index in range(warmup + repeats):
        for variant, kinds in runners.items():
            for kind, fn in kinds.items():
                elapsed = _timed(fn, device)
                if round_index >= warmup:
                    seconds[variant][kind].append(elapsed)
    return seconds


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {v: {k: statistics.median(t) for k, t in kinds.items()} for v, kinds in times.items()}


def bench_models(size: int = 128, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                 repeats: int = 5, warmup: int = 1, variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Params, MACs, forward and forward+backward time and activation memory of each model at 1x3xSxS."""
    variants = variants or model_variants()
    target = torch.device(device)
    runners, rows = {}, {}
    for label, config in variants.items():
        torch.manual_seed(0)
        model = build_model(config)
        profile = profile_model(model, size=size)
        model = model.to(target, DTYPES[dtype])
        channels = profile.input_shape[1]
        image = torch.rand(1, channels, size, size, device=target, dtype=DTYPES[dtype])
        run = torch.compile(model) if compile else model

        def forward(run: Callable = run, image: torch.Tensor = image) -> None:
            with torch.no_grad():
                run(image)

        def forward_backward(run: Callable = run, model: torch.nn.Module = model, image: torch.Tensor = image) -> None:
            run(image).float().abs().mean().backward()
            # no variant holds gradients while the others run: with all ten models' gradients alive,
            # GLMHA-Restormer's ratio read 1.00 (0.91 without, 0.87 with two models; half the system time)
            model.zero_grad(set_to_none=True)

        runners[label] = {"fwd": forward, "fwd_bwd": forward_backward}
        with torch.device("meta"):  # activation sizes from shapes alone: no memory held between variants
            shapes_only = build_model(config)
            activation = activation_bytes(shapes_only, torch.empty(1, channels, size, size))
        rows[label] = {"model": label, "params_m": profile.params / 1e6, "conv_gmacs": profile.conv_gmacs,
                       "total_gmacs": profile.total_gmacs, "activation_mb": activation / 2**20}
    median = medians(interleaved_times(runners, target, repeats, warmup))
    base = median.get(BASELINE)
    for label, row in rows.items():
        row["fwd_s"], row["fwd_bwd_s"] = median[label]["fwd"], median[label]["fwd_bwd"]
        if base:
            row["fwd_ratio"] = row["fwd_s"] / base["fwd"]
            row["fwd_bwd_ratio"] = row["fwd_bwd_s"] / base["fwd_bwd"]
            row["activation_ratio"] = row["activation_mb"] / rows[BASELINE]["activation_mb"]
    return list(rows.values())


def bench_train(patch: int = 128, batch: int = 1, device: str = "cpu", repeats: int = 3, warmup: int = 1,
                zero_stage: int = 1, peak_tflops: float | None = None,
                variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Images/s of one worker's training step: DeepSpeed (ZeRO) vs plain PyTorch on the same model."""
    import deepspeed

    from workloads.deepspeed_ops import prepare_cpu_comm_op
    from workloads.job_config import DeepSpeedConfig
    from workloads.train import deepspeed_config, init_local_process_group

    init_local_process_group()
    prepare_cpu_comm_op()
    variants = variants or {"csa-restormer": {"name": "restormer"},
                            "glmha-restormer": {"name": "restormer", "attention": "glmha"}, "hint": {"name": "hint"}}
    target = torch.device(device)
    grad_clip, engine_config = 0.01, DeepSpeedConfig(zero_stage, "auto")
    image = torch.rand(batch, 3, patch, patch, device=target)
    runners, flops = {}, {}
    for label, config in variants.items():
        torch.manual_seed(0)
        plain = build_model(config).to(target)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=3e-4, weight_decay=1e-4, fused=True)
        torch.manual_seed(0)
        wrapped = build_model(config)
        engine, *_ = deepspeed.initialize(
            model=wrapped, optimizer=torch.optim.AdamW(wrapped.parameters(), lr=3e-4, weight_decay=1e-4, fused=True),
            config=deepspeed_config(engine_config, micro_batch=batch, grad_clip=grad_clip), dist_init_required=False)
        dtype = next(engine.module.parameters()).dtype

        def plain_step(model: torch.nn.Module = plain, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss = (model(image) - image).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()

        def deepspeed_step(engine: Any = engine, dtype: torch.dtype = dtype) -> None:
            engine.backward((engine(image.to(dtype)).float() - image).abs().mean())
            engine.step()

        runners[label] = {"plain": plain_step, "deepspeed": deepspeed_step}
        flops[label] = 2e9 * profile_model(plain, size=patch, batch=batch).total_gmacs
    times = interleaved_times(runners, target, repeats, warmup)
    peak = peak_tflops or (_known_peak() if target.type == "cuda" else None)
    median, rows = medians(times), []
    for label, kinds in times.items():
        row = {"model": label, "plain_img_s": batch / median[label]["plain"],
               "deepspeed_img_s": batch / median[label]["deepspeed"]}
        # the two steps of a round ran back to back: their ratio drifts less than either time on a busy machine
        row["deepspeed_overhead"] = statistics.median(d / p for d, p in zip(kinds["deepspeed"], kinds["plain"]))
        if peak:
            row["mfu"] = 3 * flops[label] / batch * row["deepspeed_img_s"] / (peak * 1e12)
        rows.append(row)
    return rows


def bench_data(patch: int = 128, batch: int = 8, *, spec: str | Path | None = None, data: str | Path | None = None,
               workers: int | None = None, batches: int = 200, size: int = 512, count: int = 32, device: str = "cpu",
               repeats: int = 1, warmup: int = 1, step_batch: int | None = None,
               folder: Path | None = None) -> list[dict[str, Any]]:
    """The training loader's crops/s and the dataset's start-up (scan) time, three ways: as before the
    node cache (every crop decodes its images, no loader processes), cold (the first decode into an
    empty cache, then crops read from disk: its pages dropped from memory) and warm (a cache hit, its
    pages in memory); next to images/s of one training step of the model at the same batch. Data: the
    spec's data.train (staged if remote), `data`, or `count` synthetic `size`-pixel PNG pairs. The
    step: `bench_train`'s DeepSpeed step (`repeats` rounds after `warmup`) at `step_batch` images, by
    default the loader's batch on a GPU and 1 on the CPU (a full Restormer's fwd+bwd of 8 crops of 128
    pixels needs about 20 GB of host memory)."""
    from workloads.data import PairedDataset, PatchBatchSampler, PatchSchedule, local_dataset, loader_workers, training_loader
    from workloads.synth import write_dataset

    folder = Path(folder or tempfile.mkdtemp(prefix="restorch-bench-data-"))
    if spec is not None:
        loaded = load_spec(spec)
        model, task = loaded.model, get_task(loaded.task.name, sigma=loaded.task.sigma)
        root = Path(data) if data else local_dataset(loaded.data.train, loaded.data, loaded.storage.endpoint_url)
        configured = loaded.data.num_workers, loaded.resources.cpus_per_worker
    else:
        model, task, configured = {"name": "restormer"}, get_task("deraining"), (None, 1)
        root = Path(data) if data else folder / "data" / "train"
        if not data and not root.is_dir():
            write_dataset(folder / "data", task, count=count + 1, size=size, val_fraction=1 / (count + 1))
    workers = loader_workers(*configured) if workers is None else workers
    target = torch.device(device)
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the cold start must decode

    def start(cached: bool) -> tuple[PairedDataset, float]:
        started = time.perf_counter()
        dataset = PairedDataset(root, task, patch_size=patch, cache=cache if cached else None)
        return dataset, time.perf_counter() - started

    def crops_per_s(dataset: PairedDataset, processes: int) -> float:
        """Crops/s from the loader's creation (its processes' start included) to the last batch on the device."""
        sampler = PatchBatchSampler(len(dataset), PatchSchedule((patch,), (batch,), (1,)), total_iterations=batches)
        started = time.perf_counter()
        for item in training_loader(dataset, sampler, processes, target):
            for key in ("input", "target"):
                item[key].to(target, non_blocking=True)
        _synchronize(target)
        return batches * batch / (time.perf_counter() - started)

    rows = []
    uncached, startup = start(cached=False)
    rows.append({"model": "before: decode per crop", "workers": 0, "startup_s": startup, "crops_per_s": crops_per_s(uncached, 0)})
    cold, startup = start(cached=True)
    _drop_from_page_cache(cold.decoded.folder)
    rows.append({"model": "cache cold: first decode", "workers": workers, "startup_s": startup,
                 "crops_per_s": crops_per_s(cold, workers)})
    warm, startup = start(cached=True)
    for file in warm.decoded.folder.iterdir():
        file.read_bytes()  # every page in memory
    rows.append({"model": "cache warm: hit", "workers": workers, "startup_s": startup, "crops_per_s": crops_per_s(warm, workers)})
    for row in rows:
        row["x_before"] = row["crops_per_s"] / rows[0]["crops_per_s"]
        row["startup_x_cold"] = row["startup_s"] / rows[1]["startup_s"]
    step_batch = step_batch or (batch if target.type == "cuda" else 1)
    (step,) = bench_train(patch=patch, batch=step_batch, device=device, repeats=repeats, warmup=warmup,
                          variants={model["name"]: model})
    rows.append({"model": f"train step: {model['name']} at batch {step_batch}", "images_per_s": step["deepspeed_img_s"]})
    return [{key: row.get(key) for key in ("model", "workers", "startup_s", "startup_x_cold", "crops_per_s", "x_before",
                                            "images_per_s")} for row in rows]


def _drop_from_page_cache(folder: Path) -> None:
    """The files of `folder` written to disk and evicted from memory: the next reads come from the disk."""
    for file in folder.iterdir():
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


# A fixed amount of training per trial: a small Restormer on 32-pixel patches of a synthetic set.
SWEEP_TRIAL_MODEL = {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                     "heads": [1, 1, 1, 1]}


def sweep_bench_spec(folder: Path, data: Path, trials: int, concurrent: int, iterations: int,
                     trial_mode: str = "auto") -> dict[str, Any]:
    """N trials of identical work (a grid over the seed), one 1-CPU worker each, `concurrent` at once; storage and
    tracking in `folder`."""
    return {
        "name": "bench-sweep",
        "model": SWEEP_TRIAL_MODEL,
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32,
                 "batch_size": 4, "max_val_images": 2},
        "train": {"iterations": iterations, "val_every": iterations, "checkpoint_every": iterations,
                  "log_every": iterations, "seed": {"grid": list(range(trials))}},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "trial_mode": trial_mode},
        "search": {"algorithm": "grid", "max_concurrent_trials": concurrent},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "bench-sweep"},
        "storage": {"path": str(folder / "runs")},
    }


def bench_sweep(trials: int = 8, concurrent: int = 2, iterations: int = 300, folder: Path | None = None,
                trial_modes: tuple[str, ...] = ("job", "inline")) -> list[dict[str, Any]]:
    """Orchestration overhead: `restorch sweep` of N fixed-work trials vs the same trainings run one
    after the other in this process (same loop, same DeepSpeed engine, no Ray), and the time from the
    command to the first trial's first iteration; then the same trials under ASHA (validating 4 times):
    the wall time of the trials it stopped over their share of the training (`asha_stopped_wall_ratio`).
    One row per trial mode (resources.trial_mode), all against the same direct trainings."""
    folder = Path(folder or tempfile.mkdtemp(prefix="restorch-bench-sweep-"))
    data = folder / "data"
    _write_sweep_data(data)
    direct_s = _train_one_after_another(sweep_bench_spec(folder, data, trials, concurrent, iterations), trials,
                                        folder / "direct")
    return [_sweep_row(sweep_bench_spec(folder / mode, data, trials, concurrent, iterations, mode), folder / mode, direct_s)
            for mode in trial_modes]


def _sweep_row(raw: dict[str, Any], folder: Path, direct_s: float) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    trials, iterations = len(raw["train"]["seed"]["grid"]), raw["train"]["iterations"]
    timeline = folder / "timeline.txt"
    started_at = time.time()
    _run_sweep_command(raw, folder, timeline)
    sweep_s = time.time() - started_at
    first_iteration = _first_iteration_time(raw["tracking"])
    reached = first_reached(timeline)  # where the start-up goes: seconds from the command to each phase
    stopped = _asha_stopped_trials(raw, folder)
    seconds_per_iteration = direct_s / trials / iterations
    ratios = [float(row["wall_s"]) / (int(row["iteration"]) * seconds_per_iteration) for row in stopped]
    return {"model": f"sweep-{raw['resources']['trial_mode']}", "direct_s": direct_s, "sweep_s": sweep_s,
            "sweep_overhead": sweep_s / direct_s, "trial_s": direct_s / trials,
            **{f"{phase}_s": reached[phase] - started_at if phase in reached else None for phase in PHASES},
            "first_iteration_s": first_iteration - started_at, "asha_stopped": len(stopped),
            "asha_stopped_wall_ratio": sum(ratios) / len(ratios) if ratios else None}


# The sweep benchmark's steps. Each imports what only it needs and is slow to import (skimage, the
# training recipe, MLflow: seconds each), so that the other benchmarks do not pay for them.

def _write_sweep_data(folder: Path) -> None:
    from workloads.synth import write_dataset

    write_dataset(folder, get_task("deraining"), count=24, size=64, seed=0)


def _train_one_after_another(raw: dict[str, Any], trials: int, folder: Path) -> float:
    """Seconds to train the sweep's trials in this process, one after the other (no Ray)."""
    from workloads.train import init_local_process_group, run_training

    init_local_process_group()
    started = time.perf_counter()
    for seed in range(trials):
        spec = parse_spec(resolve_trial(raw, {"train.seed": seed}))
        run_training(job_config(spec, f"direct-{seed}", str(folder)), LocalSession(folder / str(seed)))
    return time.perf_counter() - started


def _run_sweep_command(raw: dict[str, Any], folder: Path, timeline: Path) -> None:
    """`restorch sweep` of `raw` in a new process on its own Ray, writing when it reaches each phase to `timeline`."""
    spec_file = folder / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [str(Path(sys.executable).parent / "restorch"), "sweep", str(spec_file), "--yes"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment[TIMELINE_ENV] = str(timeline)
    subprocess.run(command, check=True, cwd=folder, env=environment, stdout=subprocess.DEVNULL)


def _asha_stopped_trials(raw: dict[str, Any], folder: Path) -> list[dict[str, str]]:
    """The results rows of the trials that ASHA stopped, in a sweep of `raw`'s trials validating 4 times."""
    every = max(1, raw["train"]["iterations"] // 4)
    asha = {**raw, "name": "bench-asha",
            "train": {**raw["train"], "val_every": every, "log_every": every, "checkpoint_every": every},
            "search": {**raw["search"], "scheduler": "asha", "grace_period": 1, "reduction_factor": 2}}
    _run_sweep_command(asha, folder, folder / "timeline-asha.txt")
    with open(folder / "runs" / "bench-asha" / "results.csv") as results:
        return [row for row in csv.DictReader(results) if row["status"].startswith("stopped")]


def _first_iteration_time(tracking: dict[str, str]) -> float:
    """When (epoch seconds) the sweep's first trial logged its first iteration to MLflow."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.keys import ITERATION, TRIAL_TAG
    from orchestrator.tracking.store import experiment_id, has_tag, search_runs

    client = MlflowClient(tracking["uri"])
    children = search_runs(client, [experiment_id(client, tracking["experiment"])], has_tag(TRIAL_TAG))
    return min(m.timestamp for run in children for m in client.get_metric_history(run.info.run_id, ITERATION)
               if m.step == 1) / 1000


def _known_peak() -> float | None:
    return peak_bf16_tflops(torch.cuda.get_device_name())


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def log_benchmark(kind: str, rows: list[dict[str, Any]], settings: dict[str, Any], uri: str | None = None) -> str:
    """A `benchmark` MLflow run: the settings as params, each row's numbers as metrics, the table as artifacts."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.keys import BENCHMARK_TAG, HOST_TAG, KIND_TAG
    from orchestrator.tracking.record import log_record, timing_protocol
    from orchestrator.tracking.runs import numeric_metrics
    from orchestrator.tracking.store import get_or_create_experiment, resolve_uri

    resolved = resolve_uri(uri)
    client = MlflowClient(resolved)
    experiment_id = get_or_create_experiment(client, BENCHMARK_EXPERIMENT, resolved)
    run = client.create_run(experiment_id, run_name=f"bench-{kind}", tags={
        KIND_TAG: "benchmark", BENCHMARK_TAG: kind, HOST_TAG: platform.node(),
        "device": torch.cuda.get_device_name() if settings.get("device") == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": str(torch.get_num_threads())})
    run_id = run.info.run_id
    log_record(client, run_id, dtype=settings.get("dtype"), timing=timing_protocol(settings))
    for key, value in settings.items():
        client.log_param(run_id, key, value)
    # one metric per row and column; MLflow names allow no '+': restormer+glmha -> restormer_glmha
    numbers = {re.sub(r"[^\w\-. :/]", "_", f"{row['model']}.{key}"): value for row in rows for key, value in row.items()}
    client.log_batch(run_id, metrics=numeric_metrics(numbers, 0))
    client.log_text(run_id, format_table(rows, list(rows[0])), f"{kind}.txt")
    client.log_text(run_id, to_csv(rows, list(rows[0])), f"{kind}.csv")
    client.set_terminated(run_id)
    return run_id
