"""The training recipe each Ray Train worker runs, read top to bottom: setup_model, setup_data, setup_engine,
resume, train_loop.

`config` is the job's `JobConfig` (workloads/job_config.py), made from an experiment spec by
orchestrator/run/jobs.py: model (registry config), task, data (folders + patch schedule), train
(iterations, optimiser, schedule, intervals, seed), deepspeed (ZeRO stage, precision), storage (where
checkpoints go) and, for a pbt trial, its segment (where this fit stops, and another job's checkpoint to
start from when the job has none of its own).

Per worker: build the model, wrap it with DeepSpeed (AdamW, Restormer's lr schedule, gradient
clipping, ZeRO), resume from the last checkpoint if Ray Train hands one over, then iterate: this
worker's share of the step's global batch of random crops (sized by the progressive schedule), in
`train.grad_accumulation` micro-batches: L1 (or MRAE) loss, backward; then the optimizer step. Every
`val_every` iterations: whole-image validation by the task's protocol. Every `checkpoint_every`
iterations and at the end: a DeepSpeed checkpoint (model, optimiser, scheduler, iteration, RNG),
reported to Ray Train; the final one also holds `model.pt`, the consolidated fp32 state dict.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import random
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models import build_model
from workloads.data import (PairedDataset, PatchBatchSampler, PatchSchedule, load_datasets, loader_workers,
                            training_loader)
from workloads.job_config import DeepSpeedConfig, JobConfig, TrainConfig
from workloads.metrics import mrae, over_sets
from workloads.schedule import lr_factor
from workloads.session import RayTrainSession, Session, newest_intact
from workloads.tasks import Task, get_task

CHECKPOINT_TAG = "state"
CONSOLIDATED_MODEL = "model.pt"


def train_loop_per_worker(config: JobConfig) -> dict[str, Any]:
    """Entry point of a Ray Train worker."""
    return run_training(config, RayTrainSession())


def run_training(config: JobConfig, session: Session) -> dict[str, Any]:
    """The recipe; returns the last validation's metrics."""
    task = get_task(config.task.name, sigma=config.task.sigma)
    model = setup_model(config)
    data = setup_data(config, task)
    engine = setup_engine(config, model, session.world_size)
    start, last_validation = resume(engine, config, session)
    return train_loop(engine, data, task, config, session, start, last_validation)


def setup_model(config: JobConfig) -> torch.nn.Module:
    """The model, with the same initial weights on every rank (each rank's data differs: the sampler's)."""
    seed_everything(config.train.seed)
    return build_model(config.model)


@dataclasses.dataclass
class Data:
    schedule: PatchSchedule  # patch size and global batch by iteration
    train_set: PairedDataset
    val_sets: PairedDataset | dict[str, PairedDataset]


def setup_data(config: JobConfig, task: Task) -> Data:
    """The patch schedule and the datasets, staged and decoded once per node."""
    schedule = PatchSchedule.from_config(config.data.schedule)
    val_tasks = {name: benchmark_task(task, benchmark) for name, benchmark in config.data.val_benchmarks.items()}
    train_set, val_sets = load_datasets(config.data, task, seed=config.train.seed, val_tasks=val_tasks,
                                        endpoint_url=config.storage.endpoint_url, patch_size=schedule.max_patch_size)
    return Data(schedule, train_set, val_sets)


def benchmark_task(task: Task, benchmark: str) -> Task:
    """`task` measured by the catalogued `benchmark`'s protocol, at the task's noise level. The catalogue's
    protocols are its tasks' own (workloads/benchmarks.py); where the authors measured otherwise (MATLAB's
    volume SSIM, RealBlur's alignment), the entry's metric_notes say so and restorch does not reproduce it."""
    from workloads.benchmarks import get_benchmark

    return dataclasses.replace(task, protocol=get_benchmark(benchmark).protocol(task.noise_sigma))


def setup_engine(config: JobConfig, model: torch.nn.Module, world_size: int) -> Any:
    """The DeepSpeed engine: AdamW, Restormer's lr schedule, gradient clipping, ZeRO."""
    import deepspeed  # imported in the worker: importing it in the Ray driver breaks Ray

    from workloads.deepspeed_ops import prepare_cpu_comm_op

    train = config.train
    prepare_cpu_comm_op()
    # fused: one pass, no temporaries. ZeRO steps the optimizer on one flat copy of all the parameters, where
    # the unfused AdamW allocates full-size temporaries: its step took 1.5x the fused one (CSA-Restormer, CPU).
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.betas),
                                  weight_decay=train.weight_decay, fused=True)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
            i, total=train.iterations, base_lr=train.lr, min_lr=train.min_lr,
            warmup=train.warmup_iterations, constant=train.constant_iterations)),
        config=deepspeed_config(config.deepspeed, micro_batch=micro_batch(config, world_size),
                                accumulation=train.grad_accumulation, grad_clip=train.grad_clip),
        dist_init_required=False,
    )
    return engine


def resume(engine: Any, config: JobConfig, session: Session) -> tuple[int, dict[str, Any]]:
    """Load the newest intact checkpoint Ray Train hands over or, in a pbt trial's new job, the one of the
    trial it continues (`segment.init_from`), with the job's own lr and weight decay; returns the iteration
    it was written at (0: a fresh start) and the job's last validation before it (none from another job's)."""
    directory = session.resume_directory()
    own = directory is not None
    donor = config.segment.init_from if config.segment else None
    if directory is None and donor is not None:
        directory = newest_intact([(donor.path, donor.to_directory)], session.rank)
    if directory is None:
        return 0, {}
    with directory as folder:
        _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        restore_rng(Path(folder) / f"rng_rank{session.rank}.pt")
    set_hyperparameters(engine, config.train.lr, config.train.weight_decay)
    return client_state["iteration"], client_state.get("last_validation", {}) if own else {}


class Window:
    """Images and iterations since the last report, and when it was."""

    def __init__(self) -> None:
        self.images, self.iterations, self.started = 0, 0, time.perf_counter()


def train_loop(engine: Any, data: Data, task: Task, config: JobConfig, session: Session, start: int,
               last_validation: dict[str, Any]) -> dict[str, Any]:
    """The loop, from iteration `start` to `config.stop_iteration`: reports at `reports_at` steps, validates
    every val_every and checkpoints every checkpoint_every iterations (and at the end); returns the last
    validation's metrics (`last_validation`, the one before `start`, if none is left to run: a job resumed
    from its final checkpoint). A test hook (`config.test_hook`) runs before each iteration."""
    train, rank, world_size = config.train, session.rank, session.world_size
    hook = config.test_hook.load() if config.test_hook else None
    sampler = training_sampler(config, len(data.train_set), start, rank, world_size)
    workers = loader_workers(config.data.num_workers, config.resources.cpus_per_worker)
    loader = training_loader(data.train_set, sampler, workers, engine.device)
    dtype = next(engine.module.parameters()).dtype
    window, result = Window(), dict(last_validation)
    for iteration, batch in enumerate(loader, start=start):
        step = iteration + 1
        if hook is not None:
            hook(step=step, rank=rank)
        lr = engine.get_lr()[0]
        inputs, targets = (batch[key].to(engine.device, dtype, non_blocking=True) for key in ("input", "target"))
        loss = train_step(engine, task, inputs, targets, train.grad_accumulation)
        window.images += inputs.shape[0]
        window.iterations += 1
        if not reports_at(step, start, train):
            continue
        elapsed = time.perf_counter() - window.started
        metrics = {
            "iteration": step,
            "resumed_from": start,
            "loss": mean_over_ranks(loss.detach().float(), world_size),
            "lr": lr,
            "patch_size": data.schedule.at(iteration)[0],
            "images_per_s_worker": window.images / elapsed,
            "images_per_s": window.images * world_size / elapsed,
            "peak_memory_mb": peak_memory_mb(engine.device),
        }
        if step % train.val_every == 0 or step == train.iterations:
            metrics.update(validate_sets(engine.module, data.val_sets, task, rank, world_size, config.data.max_val_images))
            result.update(metrics)
        if rank == 0:
            print(progress_line(metrics, train.iterations, elapsed / window.iterations), flush=True)
        if step % train.checkpoint_every == 0 or step == train.iterations:
            report_checkpoint(engine, session, metrics, result, config.model, config.storage.folder,
                              final=step == train.iterations)
        else:
            session.report(metrics)
        window = Window()
    return result


def train_step(engine: Any, task: Task, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int) -> torch.Tensor:
    """One optimizer step over this rank's share of the batch, in `accumulation` micro-batches; the mean loss."""
    losses = []
    for micro_inputs, micro_targets in zip(inputs.chunk(accumulation), targets.chunk(accumulation)):
        losses.append(task_loss(task, engine(micro_inputs).float(), micro_targets.float()))
        engine.backward(losses[-1])  # scaled by 1/accumulation
        engine.step()  # the optimizer steps after the last micro-batch
    return torch.stack(losses).mean()


def reports_at(step: int, start: int, train: TrainConfig) -> bool:
    """Every log_every iterations, at validations and checkpoints, and after the first iteration: progress
    (and the sweep's start-up benchmark) sees at once that training runs."""
    return (step % train.log_every == 0 or step % train.val_every == 0 or step % train.checkpoint_every == 0
            or step in (start + 1, train.iterations))


def training_sampler(config: JobConfig, dataset_size: int, start: int, rank: int, world_size: int) -> PatchBatchSampler:
    """This rank's share of each step's global batch (data.batch_size, or the schedule's batch sizes):
    every rank draws the same global batch and keeps its slice, so any number of workers sees the same."""
    schedule = PatchSchedule.from_config(config.data.schedule)
    shares = dataclasses.replace(schedule, batch_sizes=tuple(batch // world_size for batch in schedule.batch_sizes))
    return PatchBatchSampler(dataset_size, shares, total_iterations=config.stop_iteration,
                             seed=config.train.seed, start_iteration=start, rank=rank, world_size=world_size)


def micro_batch(config: JobConfig, world_size: int, iteration: int = 0) -> int:
    """Samples a worker computes at once: the step's global batch over workers x accumulation steps."""
    batch = PatchSchedule.from_config(config.data.schedule).at(iteration)[1]
    return batch // (world_size * config.train.grad_accumulation)


def set_hyperparameters(engine: Any, lr: float, weight_decay: float) -> None:
    """The job's own base lr and weight decay on a loaded optimizer/scheduler state (the same values,
    unless a pbt trial continues another trial's state with mutated ones): the schedule goes on from
    the loaded iteration, scaled to the new base lr."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), weight_decay=weight_decay)


def deepspeed_config(config: DeepSpeedConfig, *, micro_batch: int, grad_clip: float, accumulation: int = 1) -> dict[str, Any]:
    """DeepSpeed's config from the job: micro-batch and accumulation steps, ZeRO stage, precision, clipping
    (optimizer and scheduler passed in). With a progressive schedule `micro_batch` is the first stage's:
    DeepSpeed only counts samples with it."""
    precision, stage = resolved_precision(config.precision), config.zero_stage
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        # ZeRO-0/1 keep whole gradients until the step: copying each into one contiguous buffer as backward
        # produces it (DeepSpeed's default, against fragmentation when ZeRO-2 partitions them) only adds a
        # copy, a tenth of HINT's backward+step on one CPU worker.
        "zero_optimization": {"stage": stage, "contiguous_gradients": stage >= 2},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: DeepSpeed's fused CPU Adam takes minutes to build
        "steps_per_print": 10**9,
    }


def resolved_precision(precision: str) -> str:
    """The precision a job trains in on this process's device: `auto` is bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def task_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task.loss == "mrae":
        return mrae(output, target).mean()
    return (output - target).abs().mean()


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: PairedDataset, task: Task, rank: int, world_size: int,
             max_images: int | None) -> dict[str, float]:
    """Whole-image metrics by the task's protocol, averaged over the validation set (split by rank)."""
    model.eval()
    dtype = next(model.parameters()).dtype
    names = task.protocol.metrics
    count = min(len(dataset), max_images or len(dataset))
    sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64)
    for index in range(rank, count, world_size):
        item = dataset[index]
        inputs, target = item["input"][None], item["target"][None]
        output = model(inputs.to(next(model.parameters()).device, dtype)).float().cpu()
        restored, degraded = task.protocol.measure_batch(output, target), task.protocol.measure_batch(inputs, target)
        sums += torch.tensor([*(float(restored[n][0]) for n in names), *(float(degraded[n][0]) for n in names), 1.0],
                             dtype=torch.float64)
    model.train()
    if world_size > 1:  # on the model's device: a GPU job's NCCL reduces CUDA tensors only
        sums = sums.to(next(model.parameters()).device)
        dist.all_reduce(sums)
    means = (sums[:-1] / sums[-1]).tolist()
    metrics = dict(zip(names, means[: len(names)]))
    metrics.update({f"input_{n}": v for n, v in zip(names, means[len(names):])})
    return metrics


def validate_sets(model: torch.nn.Module, val_sets: PairedDataset | dict[str, PairedDataset], task: Task, rank: int,
                  world_size: int, max_images: int | None) -> dict[str, float]:
    """`validate` on the validation set, or on each named set: the metrics per set (psnr/Rain100L) and
    their mean over the sets (psnr, what sweeps rank and stop trials by)."""
    if isinstance(val_sets, PairedDataset):
        return validate(model, val_sets, task, rank, world_size, max_images)
    return over_sets({name: validate(model, dataset, dataset.task, rank, world_size, max_images)
                      for name, dataset in val_sets.items()})


def report_checkpoint(engine: Any, session: Session, metrics: dict[str, Any], last_validation: dict[str, Any],
                      model_config: dict[str, Any], job_folder: str, final: bool) -> None:
    """Every rank writes its part of a DeepSpeed checkpoint and reports it; Ray merges the parts into
    `job_folder`/checkpoint_{iteration}. The final one also holds model.pt (`model_config` rebuilds it).
    `last_validation` goes with it: what a job resumed from it returns if nothing is left to run."""
    with tempfile.TemporaryDirectory(prefix="restorch-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                               client_state={"iteration": metrics["iteration"], "last_validation": last_validation})
        torch.save(rng_state(), Path(directory) / f"rng_rank{session.rank}.pt")
        if final:
            weights = consolidated_state_dict(engine)  # on every rank: a collective
            if session.rank == 0:
                torch.save({"model_config": model_config, "state_dict": weights}, Path(directory) / CONSOLIDATED_MODEL)
        name = f"checkpoint_{metrics['iteration']:07d}"
        session.report({**metrics, "checkpoint_path": f"{job_folder}/{name}"}, checkpoint_dir=Path(directory),
                       checkpoint_name=name)


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The full fp32 weights on the CPU. A collective: every rank must call it. In bf16 the fp32 master
    weights live in the optimizer: under ZeRO-0 a whole copy of each parameter on every rank; under
    ZeRO 1/2 (fp32 too) partitioned over the ranks, each parameter's all-reduced from its partitions
    (on the engine's device). Buffers come from the module."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer, copies = engine.optimizer, {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # ZeRO-0 bf16
        copies = {id(low): high for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                  for low, high in zip(lows, highs)}
    state = engine.module.state_dict()
    for name, param in engine.module.named_parameters(remove_duplicate=False):  # the same order on every rank
        master = copies[id(param)] if id(param) in copies else safe_get_full_fp32_param(param)
        state[name] = param if master is None else master  # None: no optimizer copy (ZeRO-0 fp32)
    return {name: (value.float() if value.is_floating_point() else value).detach().cpu()
            for name, value in state.items()}


def load_consolidated(path: str | Path) -> torch.nn.Module:
    """Rebuild the trained model from `model.pt` without DeepSpeed."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=False)
    model = build_model(saved["model_config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar over the ranks, reduced on the scalar's own (the engine's) device."""
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: Path) -> None:
    if not path.exists():  # a checkpoint written by a different number of workers
        return
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def machine_name(use_gpu: bool) -> str:
    """This machine as a report names it: host, then its GPUs or its CPU model and count."""
    if use_gpu and torch.cuda.is_available():
        return f"{socket.gethostname()}: {torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    cpu = models[0] if models else platform.processor() or platform.machine()
    return f"{socket.gethostname()}: {cpu}, {os.cpu_count()} CPUs"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress_line(metrics: dict[str, Any], total: int, seconds_per_iteration: float) -> str:
    eta = (total - metrics["iteration"]) * seconds_per_iteration
    line = (f"[restorch] iter {metrics['iteration']}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics['images_per_s']:.1f} img/s")
    if "psnr" in metrics:
        line += f" psnr {metrics['psnr']:.2f} (input {metrics['input_psnr']:.2f})"
    return f"{line} eta {eta:.0f}s"


def init_local_process_group(use_gpu: bool = False) -> None:
    """A one-process group, for running the loop outside a Ray Train job (inline sweep trials, tests, benchmarks);
    with `use_gpu`, NCCL for CUDA tensors and gloo for CPU ones, as a GPU job has."""
    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_gpu else "gloo", rank=0, world_size=1)
