"""The loop's collectives across ranks, in 2 spawned processes (no Ray): fast checks of what a
multi-GPU job does that a one-process run never shows.

A GPU job's NCCL has a backend for CUDA tensors only; on this CPU machine `cuda:gloo` builds a
process group with the same device map, so a collective that a GPU job could not run fails here too.
Every group has a short timeout: a collective that one rank enters alone fails fast instead of hanging.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_RESTORMER
from test_train import make_spec

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
    from orchestrator.jobs import make_trainer

    spec = make_spec(derain_data, tmp_path, resources={"num_workers": 2, "use_gpu": True})
    return make_trainer(spec, {}, name="gpu-job", storage=str(tmp_path)).backend_config.backend


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
