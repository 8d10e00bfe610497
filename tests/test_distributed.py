"""The loop's collectives across ranks, in 2 spawned processes (no Ray): fast checks of what a
multi-GPU job does that a one-process run never shows.

A GPU job's NCCL has a backend for CUDA tensors only; on this CPU machine `cuda:gloo` builds a
process group with the same device map, so a collective that a GPU job could not run fails here too.
Every group has a short timeout: a collective that one rank enters alone fails fast instead of hanging.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_RESTORMER
from test_train import GROWING_BATCH, make_spec
from workloads.job_config import JobConfig
from workloads.session import LocalSession

GROUP_TIMEOUT_S = 60


def emulate_on_cpu(backend: str) -> str:
    """A Ray Train job's backend with the same device map on this machine: NCCL -> gloo for CUDA only."""
    items = []
    for item in backend.split(","):
        name = item.rpartition(":")[2]
        items.append("cuda:gloo" if name == "nccl" else item)
    return ",".join(items)


def _rank_main(rank: int, world_size: int, backend: str, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) in `world_size` spawned processes of one process group on 127.0.0.1;
    an exception in any rank is raised here."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_main, args=(world_size, backend, port, fn, args), nprocs=world_size, join=True)


def _loop_reductions(rank: int, world_size: int, device: str, val_folder: str, out: str) -> None:
    from models import build_model
    from workloads.data import PairedDataset
    from workloads.tasks import get_task
    from workloads.train import mean_over_ranks, validate_sets

    task = get_task("deraining")
    torch.manual_seed(0)
    model = build_model(TINY_RESTORMER).to(device)
    dataset = PairedDataset(Path(val_folder), task)
    loss = mean_over_ranks(torch.tensor(float(rank + 1), device=device), world_size)
    metrics = validate_sets(model, {"a": dataset, "b": dataset}, task, rank, world_size, max_images=3)
    torch.save({"loss": loss, "metrics": metrics}, Path(out) / f"rank{rank}.pt")


def job_backend(tmp_path: Path, derain_data: Path) -> str:
    """The process-group backend Ray Train gives a 2-worker GPU job (orchestrator/jobs.make_trainer)."""
    from orchestrator.run.jobs import job_config, make_trainer

    spec = make_spec(derain_data, tmp_path, resources={"num_workers": 2, "use_gpu": True})
    return make_trainer(spec, job_config(spec, "gpu-job", str(tmp_path))).backend_config.backend


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_loop_reductions_run_under_a_gpu_jobs_process_group(device, derain_data, tmp_path):
    """The loss mean and the validation sums reduce under a GPU job's process group and match one
    process's validation. cpu: the group Ray Train gives a GPU job, its device map emulated on CPU.
    cuda: a CUDA-only group (NCCL's device map; two ranks share the GPU), model and loss on the GPU."""
    backend = emulate_on_cpu(job_backend(tmp_path, derain_data)) if device == "cpu" else "cuda:gloo"
    run_ranks(_loop_reductions, device, str(derain_data / "val"), str(tmp_path), backend=backend)

    from models import build_model
    from workloads.data import PairedDataset
    from workloads.tasks import get_task
    from workloads.train import validate

    task = get_task("deraining")
    torch.manual_seed(0)
    alone = validate(build_model(TINY_RESTORMER), PairedDataset(derain_data / "val", task), task, 0, 1, max_images=3)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"] == pytest.approx(1.5)
        for name, value in alone.items():
            assert result["metrics"][f"{name}/a"] == pytest.approx(value, rel=1e-6)
            assert result["metrics"][name] == pytest.approx(value, rel=1e-6)


class ReportBarrierSession(LocalSession):
    """A LocalSession of one rank whose report waits for every rank's report, as `ray.train.report`
    does (outside the process group: a rank stuck in a collective keeps the others waiting here)."""

    def __init__(self, directory: Path, rank: int, world_size: int) -> None:
        super().__init__(directory / f"rank{rank}", rank=rank, world_size=world_size)
        self.barrier = directory / "reported"

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        super().report(metrics, checkpoint_dir, checkpoint_name)
        self.barrier.mkdir(exist_ok=True)
        (self.barrier / f"{len(self.reports)}-{self.rank}").touch()
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while len(list(self.barrier.glob(f"{len(self.reports)}-*"))) < self.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: the other ranks never reported (one is stuck in a collective)")
            time.sleep(0.05)


def _final_checkpoints(rank: int, world_size: int, out: str, cases: list[tuple[int, str]]) -> None:
    """Train a tiny model 2 steps per case (ZeRO stage, precision), write the final checkpoint through
    the loop's report_checkpoint, and (rank 0) check its model.pt."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from models import build_model
    from workloads.deepspeed_ops import prepare_cpu_comm_op
    from workloads.job_config import DeepSpeedConfig
    from workloads.train import CHECKPOINT_TAG, CONSOLIDATED_MODEL, deepspeed_config, load_consolidated, report_checkpoint

    prepare_cpu_comm_op()
    for stage, precision in cases:
        case = f"ZeRO-{stage} {precision}, {world_size} worker(s)"
        torch.manual_seed(0)
        model = build_model(TINY_RESTORMER)
        config = deepspeed_config(DeepSpeedConfig(stage, precision), micro_batch=2, grad_clip=1.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                          config=config, dist_init_required=False)
        generator, dtype = torch.Generator().manual_seed(rank), next(engine.module.parameters()).dtype
        for _ in range(2):
            inputs, targets = (torch.rand(2, 3, 16, 16, generator=generator).to(engine.device, dtype) for _ in range(2))
            engine.backward((engine(inputs).float() - targets.float()).abs().mean())
            engine.step()
        directory = Path(out) / f"zero{stage}-{precision}"
        session = ReportBarrierSession(directory, rank, world_size)
        report_checkpoint(engine, session, {"iteration": 2}, {}, TINY_RESTORMER, str(directory), final=True)
        if rank != 0:
            continue
        checkpoint = session.checkpoints[-1]
        assert (checkpoint / CONSOLIDATED_MODEL).exists(), f"{case}: no {CONSOLIDATED_MODEL}"
        weights = load_consolidated(checkpoint / CONSOLIDATED_MODEL).state_dict()
        assert all(v.dtype == torch.float32 for v in weights.values()), f"{case}: not fp32"
        module = engine.module.state_dict()
        for name, value in weights.items():  # the module holds the fp32 weights rounded to its precision
            assert torch.equal(value.to(module[name].dtype), module[name].cpu()), f"{case}: {name} differs"
        if precision == "bf16":  # more than the bf16 module: the fp32 master weights
            assert any(not torch.equal(v, v.bfloat16().float()) for v in weights.values()), f"{case}: bf16 values only"
        # The fp32 master weights as DeepSpeed checkpoints them (the ranks' parts merged, as Ray merges them).
        merged = directory / "merged"
        for part in directory.glob("rank*/checkpoint_*"):
            shutil.copytree(part, merged, dirs_exist_ok=True)
        if stage > 0:
            expected = get_fp32_state_dict_from_zero_checkpoint(merged, tag=CHECKPOINT_TAG)
        elif precision == "bf16":  # the optimizer's fp32 copy of each parameter, in the model states
            saved = torch.load(merged / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", weights_only=False)
            copies = [copy for group in saved["optimizer"]["fp32_groups"] for copy in group]
            expected = dict(zip([name for name, _ in engine.module.named_parameters()], copies, strict=True))
        else:
            expected = {}  # no optimizer copy: the module's weights, checked above
        for name, value in expected.items():
            assert torch.equal(weights[name], value.float()), f"{case}: {name} is not DeepSpeed's fp32 weight"


@pytest.mark.parametrize("world_size", [1, 2])
def test_final_checkpoint_model_pt_for_every_zero_stage_and_precision(world_size, tmp_path):
    """model.pt is written and loads for ZeRO 0/1/2 x fp32/bf16, with every rank in each collective."""
    cases = [(stage, precision) for stage in (0, 1, 2) for precision in ("fp32", "bf16")]
    run_ranks(_final_checkpoints, str(tmp_path), cases, world_size=world_size)


def _train(rank: int, world_size: int, config: JobConfig, out: str) -> None:
    from workloads.train import run_training

    session = LocalSession(Path(out) / f"rank{rank}", rank=rank, world_size=world_size)
    run_training(config, session)
    torch.save(session.reports, Path(out) / f"reports{rank}.pt")


@pytest.mark.slow  # 20-30 s on 2 cores: `make test` stays under 5 minutes
def test_one_and_two_workers_train_alike(derain_data, tmp_path):
    """One spec on 1 worker (2 micro-batches a step) and on 2 workers: the same global batches, so the
    same lr at every step and, up to float summation order, the same losses and validation."""
    from orchestrator.run.jobs import job_config

    reports = {}
    for workers, accumulation in ((1, 2), (2, 1)):
        spec = make_spec(derain_data, tmp_path, data=GROWING_BATCH, resources={"num_workers": workers},
                         train={"iterations": 4, "val_every": 4, "checkpoint_every": 4, "grad_accumulation": accumulation})
        out = tmp_path / f"{workers}-workers"
        run_ranks(_train, job_config(spec, "job", str(out)), str(out), world_size=workers)
        reports[workers] = torch.load(out / "reports0.pt")
    one, two = reports[1], reports[2]
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == [1, 2, 3, 4]
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    # Gradients are summed in another order (over ranks, not micro-batches): equal to ~1e-7 here; the loss
    # moves by 10-30% a step, so a different batch would be far off.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert two[-1]["psnr"] == pytest.approx(one[-1]["psnr"], rel=1e-4)
