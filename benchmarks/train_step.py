"""Training-step throughput of one worker: DeepSpeed (ZeRO-1) vs plain PyTorch on the same model.

    .venv/bin/python benchmarks/train_step.py --patch 128 --batch 1 --repeats 3

For CSA-Restormer, GLMHA-Restormer and HINT: images/s of a full training step (forward, L1 loss,
backward, clipping, AdamW) with DeepSpeed's engine and with a plain PyTorch loop, measured
interleaved in one run; the overhead ratio is plain images/s / DeepSpeed images/s. On a GPU
(`--device cuda`) it also prints the model-FLOPs utilisation: 3 x forward FLOPs x images/s / peak.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from models import build_model
from models.profile import profile_model
from workloads.train import deepspeed_config, init_local_process_group

MODELS = {
    "csa-restormer": {"name": "restormer"},
    "glmha-restormer": {"name": "restormer", "attention": "glmha"},
    "hint": {"name": "hint"},
}
JOB = {"train": {"grad_clip": 0.01}, "deepspeed": {"zero_stage": 1, "precision": "auto"}}


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor) -> None:
    loss = (model(image) - image).abs().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), JOB["train"]["grad_clip"])
    optimizer.step()


def deepspeed_step(engine: Any, image: torch.Tensor) -> None:
    loss = (engine(image).float() - image.float()).abs().mean()
    engine.backward(loss)
    engine.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device (for MFU)")
    args = parser.parse_args()

    import deepspeed

    init_local_process_group()
    device = torch.device(args.device)
    image = torch.rand(args.batch, 3, args.patch, args.patch, device=device)
    runners: dict[str, dict[str, Any]] = {}
    for label, config in MODELS.items():
        torch.manual_seed(0)
        plain = build_model(config).to(device)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=3e-4, weight_decay=1e-4)
        torch.manual_seed(0)
        wrapped = build_model(config)
        engine, *_ = deepspeed.initialize(
            model=wrapped, optimizer=torch.optim.AdamW(wrapped.parameters(), lr=3e-4, weight_decay=1e-4),
            config=deepspeed_config(JOB, args.batch), dist_init_required=False,
        )
        dtype = next(engine.module.parameters()).dtype
        runners[label] = {
            "plain": lambda m=plain, o=optimizer: plain_step(m, o, image),
            "deepspeed": lambda e=engine, d=dtype: deepspeed_step(e, image.to(d)),
            "gflops": 2 * profile_model(plain, size=args.patch, batch=args.batch).total_gmacs,
        }

    seconds: dict[str, dict[str, list[float]]] = {label: {"plain": [], "deepspeed": []} for label in runners}
    for round_index in range(args.warmup + args.repeats):
        for label, runner in runners.items():
            for kind in ("plain", "deepspeed"):
                synchronize(device)
                start = time.perf_counter()
                runner[kind]()
                synchronize(device)
                if round_index >= args.warmup:
                    seconds[label][kind].append(time.perf_counter() - start)

    print(f"one worker, patch {args.patch}, batch {args.batch}, {device}, median of {args.repeats} steps after "
          f"{args.warmup} warm-up, ZeRO-1")
    header = f"{'model':<16} {'plain img/s':>12} {'DeepSpeed img/s':>16} {'DS overhead':>12}"
    if args.peak_tflops:
        header += f" {'MFU (DS)':>9}"
    print(header)
    print("-" * len(header))
    for label, kinds in seconds.items():
        plain_rate = args.batch / statistics.median(kinds["plain"])
        ds_rate = args.batch / statistics.median(kinds["deepspeed"])
        line = f"{label:<16} {plain_rate:>12.3f} {ds_rate:>16.3f} {plain_rate / ds_rate:>12.3f}"
        if args.peak_tflops:
            line += f" {3 * runners[label]['gflops'] * 1e9 / args.batch * ds_rate / (args.peak_tflops * 1e12):>9.2%}"
        print(line)


if __name__ == "__main__":
    main()
