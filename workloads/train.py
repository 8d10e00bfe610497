"""The training recipe each Ray Train worker runs: one plain loop, read it top to bottom.

`config` is the job config made by orchestrator/run/jobs.py from an experiment spec (plain data):
model (registry config), task, data (folders + patch schedule), train (iterations, optimiser,
schedule, intervals, seed), deepspeed (ZeRO stage, precision), run (where checkpoints are stored;
for a pbt trial also where this run stops, `stop_at`, and `init_from`, another job's checkpoint to
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
from workloads.data import PairedDataset, PatchBatchSampler, PatchSchedule, load_datasets, training_loader
from workloads.metrics import mrae, over_sets
from workloads.schedule import lr_factor
from workloads.session import LocalSession, RayTrainSession, newest_intact
from workloads.tasks import Task, get_task

CHECKPOINT_TAG = "state"
CONSOLIDATED_MODEL = "model.pt"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a Ray Train worker."""
    return run_training(config, RayTrainSession())


def run_training(config: dict[str, Any], session: RayTrainSession | LocalSession) -> dict[str, Any]:
    import deepspeed  # imported in the worker: importing it in the Ray driver breaks Ray

    from workloads.deepspeed_ops import prepare_cpu_comm_op

    train, data = config["train"], config["data"]
    task = get_task(config["task"]["name"], sigma=config["task"].get("sigma"))
    rank, world_size, accumulation = session.rank, session.world_size, train["grad_accumulation"]

    # Same initial weights on every rank; different (disjoint) data per rank comes from the sampler.
    seed_everything(train["seed"])
    model = build_model(config["model"])
    schedule = PatchSchedule.from_config(data["schedule"])  # global batches
    train_set, val_sets = load_datasets(config, task, patch_size=schedule.max_patch_size)  # staged, decoded once per node

    prepare_cpu_comm_op()
    # fused: one pass, no temporaries. ZeRO steps the optimizer on one flat copy of all the parameters, where
    # the unfused AdamW allocates full-size temporaries: its step took 1.5x the fused one (CSA-Restormer, CPU).
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=train["lr"], betas=tuple(train["betas"]),
                                    weight_decay=train["weight_decay"], fused=True),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
            i, total=train["iterations"], base_lr=train["lr"], min_lr=train["min_lr"],
            warmup=train["warmup_iterations"], constant=train["constant_iterations"])),
        config=deepspeed_config(config, micro_batch(config, world_size)),
        dist_init_required=False,
    )
    dtype = next(engine.module.parameters()).dtype

    start = 0
    resume = session.resume_directory()
    donor = config.get("run", {}).get("init_from")
    if resume is None and donor is not None:  # a pbt trial's new job: the state of the trial it continues
        resume = newest_intact([(donor.path, donor.to_directory)], rank)
    if resume is not None:
        with resume as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            start = client_state["iteration"]
            restore_rng(Path(directory) / f"rng_rank{rank}.pt")
        set_hyperparameters(engine, train["lr"], train["weight_decay"])

    sampler = training_sampler(config, len(train_set), start, rank, world_size)
    loader = training_loader(train_set, sampler, config, engine.device)
    fault = config.get("fault")

    window_images, window_iterations, window_start, result = 0, 0, time.perf_counter(), {}
    for iteration, batch in enumerate(loader, start=start):
        step = iteration + 1
        if fault and fault["rank"] == rank and step == fault["at_iteration"] and not Path(fault["marker"]).exists():
            Path(fault["marker"]).touch()  # fail once: the restarted worker must get past this point
            raise RuntimeError(f"injected fault in worker {rank} at iteration {step}")

        lr = engine.get_lr()[0]
        inputs, targets = (batch[key].to(engine.device, dtype, non_blocking=True) for key in ("input", "target"))
        losses = []
        for micro_inputs, micro_targets in zip(inputs.chunk(accumulation), targets.chunk(accumulation)):
            losses.append(task_loss(task, engine(micro_inputs).float(), micro_targets.float()))
            engine.backward(losses[-1])  # scaled by 1/accumulation
            engine.step()  # the optimizer steps after the last micro-batch
        loss = torch.stack(losses).mean()
        window_images += inputs.shape[0]
        window_iterations += 1

        # Report every log_every iterations, at validations and checkpoints, and after the first
        # iteration: progress (and the sweep's start-up benchmark) sees at once that training runs.
        if (step % train["log_every"] and step % train["val_every"] and step % train["checkpoint_every"]
                and step not in (start + 1, train["iterations"])):
            continue
        elapsed = time.perf_counter() - window_start
        metrics = {
            "iteration": step,
            "resumed_from": start,
            "loss": mean_over_ranks(loss.detach().float(), world_size),
            "lr": lr,
            "patch_size": schedule.at(iteration)[0],
            "images_per_s_worker": window_images / elapsed,
            "images_per_s": window_images * world_size / elapsed,
            "peak_memory_mb": peak_memory_mb(engine.device),
        }
        if step % train["val_every"] == 0 or step == train["iterations"]:
            metrics.update(validate_sets(engine.module, val_sets, task, rank, world_size, data.get("max_val_images")))
            result.update(metrics)
        if rank == 0:
            print(progress_line(metrics, train["iterations"], elapsed / window_iterations), flush=True)
        if step % train["checkpoint_every"] == 0 or step == train["iterations"]:
            report_checkpoint(engine, session, metrics, config, final=step == train["iterations"])
        else:
            session.report(metrics)
        window_images, window_iterations, window_start = 0, 0, time.perf_counter()
    return result


def stop_iteration(config: dict[str, Any]) -> int:
    """Where this run of the job stops: train.iterations, or the end of a pbt segment (`run.stop_at`;
    the lr schedule still spans train.iterations)."""
    return config.get("run", {}).get("stop_at") or config["train"]["iterations"]


def training_sampler(config: dict[str, Any], dataset_size: int, start: int, rank: int,
                     world_size: int) -> PatchBatchSampler:
    """This rank's share of each step's global batch (data.batch_size, or the schedule's batch sizes):
    every rank draws the same global batch and keeps its slice, so any number of workers sees the same."""
    schedule = PatchSchedule.from_config(config["data"]["schedule"])
    shares = dataclasses.replace(schedule, batch_sizes=tuple(batch // world_size for batch in schedule.batch_sizes))
    return PatchBatchSampler(dataset_size, shares, total_iterations=stop_iteration(config),
                             seed=config["train"]["seed"], start_iteration=start, rank=rank, world_size=world_size)


def micro_batch(config: dict[str, Any], world_size: int, iteration: int = 0) -> int:
    """Samples a worker computes at once: the step's global batch over workers x accumulation steps."""
    batch = PatchSchedule.from_config(config["data"]["schedule"]).at(iteration)[1]
    return batch // (world_size * config["train"]["grad_accumulation"])


def set_hyperparameters(engine: Any, lr: float, weight_decay: float) -> None:
    """The job's own base lr and weight decay on a loaded optimizer/scheduler state (the same values,
    unless a pbt trial continues another trial's state with mutated ones): the schedule goes on from
    the loaded iteration, scaled to the new base lr."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), weight_decay=weight_decay)


def deepspeed_config(config: dict[str, Any], micro_batch: int) -> dict[str, Any]:
    """DeepSpeed's config from the job: micro-batch and accumulation steps, ZeRO stage, precision, clipping
    (optimizer and scheduler passed in). With a progressive schedule `micro_batch` is the first stage's:
    DeepSpeed only counts samples with it."""
    precision, stage = config["deepspeed"]["precision"], config["deepspeed"]["zero_stage"]
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": config["train"].get("grad_accumulation", 1),
        "gradient_clipping": config["train"]["grad_clip"],
        # ZeRO-0/1 keep whole gradients until the step: copying each into one contiguous buffer as backward
        # produces it (DeepSpeed's default, against fragmentation when ZeRO-2 partitions them) only adds a
        # copy, a tenth of HINT's backward+step on one CPU worker.
        "zero_optimization": {"stage": stage, "contiguous_gradients": stage >= 2},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: DeepSpeed's fused CPU Adam takes minutes to build
        "steps_per_print": 10**9,
    }


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
    return over_sets({name: validate(model, dataset, task, rank, world_size, max_images)
                      for name, dataset in val_sets.items()})


def report_checkpoint(engine: Any, session: RayTrainSession | LocalSession, metrics: dict[str, Any],
                      config: dict[str, Any], final: bool) -> None:
    """Every rank writes its part of a DeepSpeed checkpoint and reports it; Ray merges the parts."""
    with tempfile.TemporaryDirectory(prefix="restorch-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"iteration": metrics["iteration"]})
        torch.save(rng_state(), Path(directory) / f"rng_rank{session.rank}.pt")
        if final:
            weights = consolidated_state_dict(engine)  # on every rank: a collective
            if session.rank == 0:
                torch.save({"model_config": config["model"], "state_dict": weights},
                           Path(directory) / CONSOLIDATED_MODEL)
        name = f"checkpoint_{metrics['iteration']:07d}"
        run = config.get("run", {})
        location = f"{run['storage_path']}/{run['name']}/{name}" if run else name
        session.report({**metrics, "checkpoint_path": location}, checkpoint_dir=Path(directory), checkpoint_name=name)


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


def init_local_process_group() -> None:
    """A one-process gloo group, for running the loop outside Ray (tests, benchmarks)."""
    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("gloo", rank=0, world_size=1)
