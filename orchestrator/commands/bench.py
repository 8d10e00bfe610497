"""`restorch bench models|train|data|sweep`: speed benchmarks, printed and logged to MLflow."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.commands import command_group
from orchestrator.report.results import format_table

DTYPES = ("fp32", "bf16")  # the keys of orchestrator/run/benchmarks.DTYPES: --help imports no torch


def _bench(args: argparse.Namespace) -> int:
    from orchestrator.run import benchmarks

    kind = args.bench_command
    if kind == "models":
        settings = {"size": args.size, "device": args.device, "dtype": args.dtype, "compile": args.compile,
                    "repeats": args.repeats, "warmup": args.warmup}
        rows = benchmarks.bench_models(**settings)
    elif kind == "train":
        settings = {"patch": args.patch, "batch": args.batch, "device": args.device, "repeats": args.repeats,
                    "warmup": args.warmup, "zero_stage": args.zero_stage, "peak_tflops": args.peak_tflops}
        rows = benchmarks.bench_train(**settings)
    elif kind == "data":
        from orchestrator.spec.recipes import spec_file

        settings = {"patch": args.patch, "batch": args.batch, "device": args.device, "repeats": args.repeats,
                    "warmup": args.warmup, "spec": args.spec and str(spec_file(args.spec)), "data": args.data,
                    "workers": args.workers, "batches": args.batches, "size": args.size, "count": args.count,
                    "step_batch": args.step_batch}
        rows = benchmarks.bench_data(**settings, folder=args.folder)
    else:
        settings = {"trials": args.trials, "concurrent": args.concurrent, "iterations": args.iterations,
                    "trial_modes": tuple(args.trial_modes)}
        rows = benchmarks.bench_sweep(**settings, folder=args.folder)
    print(f"{kind} benchmark, {settings}")
    print(format_table(rows, list(rows[0])))
    if not args.no_log:
        run_id = benchmarks.log_benchmark(kind, rows, settings, args.tracking_uri)
        print(f"logged to MLflow run {run_id} (experiment {benchmarks.BENCHMARK_EXPERIMENT})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(subparsers, "bench", "speed benchmarks (ratios measured in one run)")

    def common(parser: argparse.ArgumentParser, repeats: int) -> argparse.ArgumentParser:
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--repeats", type=int, default=repeats, help="measured rounds (median)")
        parser.add_argument("--warmup", type=int, default=1)
        parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
        parser.add_argument("--no-log", action="store_true", help="print only, do not log to MLflow")
        return parser

    models = common(commands.add_parser("models", help="every model: params, MACs, fwd and fwd+bwd time, memory"), 5)
    models.add_argument("--size", type=int, default=128)
    models.add_argument("--dtype", choices=DTYPES, default="fp32")
    models.add_argument("--compile", action="store_true", help="torch.compile each model")
    models.set_defaults(handler=_bench)

    train = common(commands.add_parser("train", help="training-step images/s: DeepSpeed vs plain PyTorch"), 3)
    train.add_argument("--patch", type=int, default=128)
    train.add_argument("--batch", type=int, default=1)
    train.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    train.add_argument("--peak-tflops", type=float, help="device peak FLOP/s for MFU (known GPUs are detected)")
    train.set_defaults(handler=_bench)

    data = common(commands.add_parser("data", help="training loader crops/s (before the node cache, cold, warm) and "
                                      "start-up, next to a training step's images/s"), 1)
    data.add_argument("--spec", metavar="SPEC|RECIPE", help="its model, task, data.train and loader settings (default: "
                                                           "Restormer on synthetic PNGs)")
    data.add_argument("--data", type=Path, help="a dataset folder (one split) to read instead")
    data.add_argument("--patch", type=int, default=128)
    data.add_argument("--batch", type=int, default=8)
    data.add_argument("--step-batch", type=int, help="images per training step (default: --batch on cuda, 1 on cpu)")
    data.add_argument("--workers", type=int, help="loader processes (default: as a training worker of the spec has)")
    data.add_argument("--batches", type=int, default=200, help="batches timed for each loader (its start included)")
    data.add_argument("--size", type=int, default=512, help="synthetic images' size in pixels")
    data.add_argument("--count", type=int, default=32, help="synthetic training pairs")
    data.add_argument("--folder", type=Path, help="where the synthetic data and the cache go (default: a temp dir)")
    data.set_defaults(handler=_bench)

    sweep = common(commands.add_parser("sweep", help="orchestration overhead: a sweep vs the same trainings in one process"), 1)
    sweep.add_argument("--trials", type=int, default=8)
    sweep.add_argument("--concurrent", type=int, default=2, help="trials at once (one 1-CPU worker each)")
    sweep.add_argument("--iterations", type=int, default=300, help="training iterations per trial (fixed work)")
    sweep.add_argument("--trial-modes", nargs="+", choices=["inline", "job"], default=["job", "inline"],
                       help="the sweeps' resources.trial_mode, one row each (job: each trial a Ray Train job)")
    sweep.add_argument("--folder", type=Path, help="where data, runs and the sweep's MLflow store go (default: a temp dir)")
    sweep.set_defaults(handler=_bench)
