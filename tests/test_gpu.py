"""Real GPU checks, skipped on a machine without CUDA (the CPU suite emulates a GPU job's process
group in tests/test_distributed.py): a bf16 DeepSpeed training step on the GPU and the engine's MFU,
each in a process of its own under Ray Train's GPU backend; an NCCL all-reduce across 2 GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_RESTORMER
from test_distributed import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
RAY_TRAIN_GPU_BACKEND = "cpu:gloo,cuda:nccl"  # what orchestrator/jobs.make_trainer gives a GPU job


def _bf16_steps(rank: int, world_size: int, out: str) -> None:
    import deepspeed

    from models import build_model
    from orchestrator.run.benchmarks import bench_train
    from workloads.job_config import DeepSpeedConfig
    from workloads.train import deepspeed_config

    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = build_model(TINY_RESTORMER)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=2, precision="auto"), micro_batch=2, grad_clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    image = torch.rand(2, 3, 64, 64, device=engine.device)
    losses = []
    for _ in range(3):
        loss = (engine(image.bfloat16()).float() - image).abs().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    changed = any(not torch.equal(a, b.detach().float()) for a, b in zip(before, engine.module.parameters()))
    (row,) = bench_train(patch=64, batch=2, device="cuda", repeats=2, warmup=1, zero_stage=2,
                         variants={"tiny": TINY_RESTORMER})
    torch.save({"dtype": str(next(engine.module.parameters()).dtype), "device": engine.device.type, "losses": losses,
                "changed": changed, "row": row}, Path(out) / "result.pt")


def test_bf16_deepspeed_training_step_on_the_gpu_and_its_mfu(tmp_path):
    run_ranks(_bf16_steps, str(tmp_path), world_size=1, backend=RAY_TRAIN_GPU_BACKEND)
    result = torch.load(tmp_path / "result.pt")
    assert result["device"] == "cuda" and result["dtype"] == "torch.bfloat16"  # precision auto: bf16 on a GPU
    assert result["changed"] and all(0 < loss < 1 for loss in result["losses"])
    row = result["row"]
    assert row["deepspeed_img_s"] > 0 and row["plain_img_s"] > 0
    if "mfu" in row:  # a GPU whose peak bf16 FLOP/s restorch knows (orchestrator/run/benchmarks.PEAK_BF16_TFLOPS)
        assert 0 < row["mfu"] < 1


def _all_reduce(rank: int, world_size: int, out: str) -> None:
    from workloads.train import mean_over_ranks

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    summed = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(summed)
    mean = mean_over_ranks(torch.tensor(float(rank + 1), device=device), world_size)
    torch.save({"sum": summed.cpu(), "mean": mean}, Path(out) / f"rank{rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_all_reduce_across_two_gpus(tmp_path):
    run_ranks(_all_reduce, str(tmp_path), world_size=2, backend="nccl")
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["sum"], torch.full((1024,), 3.0))
        assert result["mean"] == pytest.approx(1.5)
