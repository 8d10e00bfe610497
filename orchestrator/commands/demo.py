"""`restorch demo` (`make demo`): the main job end to end, on the embedded defaults, in the working
directory, small enough for a laptop (a few minutes on 2 CPU cores):

1. synthesize a small deraining set (`restorch_demo/rain`, kept for later runs);
2. sweep a small GLMHA-Restormer over alpha {0.4, 0.6} x K/V reduction {0.25, 0.5} with ASHA, two
   trials at a time, on the local Ray; every trial is a Ray Train + DeepSpeed job;
3. track everything in the embedded MLflow (`mlflow.db` + `mlartifacts/`);
4. print the results table and the command that opens the MLflow UI on them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from orchestrator.commands import VERBOSE_HELP
from orchestrator.commands.sweep import mlflow_ui_command
from orchestrator.console import console
from orchestrator.spec.load import parse_spec

DEMO_DATA = Path("restorch_demo/rain")


def demo_spec(data: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                  "heads": [1, 1, 1, 1], "attention": "glmha",
                  "glmha": {"alpha": {"grid": [0.4, 0.6]}, "kv_reduction": {"grid": [0.25, 0.5]}}},
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 4},
        "train": {"iterations": 40, "lr": 2e-3, "val_every": 10, "checkpoint_every": 20, "log_every": 10},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "search": {"algorithm": "grid", "scheduler": "asha", "metric": "psnr", "mode": "max", "grace_period": 2,
                   "max_concurrent_trials": 2},
    }


def _demo(args: argparse.Namespace) -> int:
    from orchestrator.run.sweep import run_sweep
    from workloads.synth import write_dataset
    from workloads.tasks import get_task

    if not (DEMO_DATA / "train").is_dir():
        counts = write_dataset(DEMO_DATA, get_task("deraining"), count=24, size=64)
        print(f"wrote {counts['train']} train + {counts['val']} val deraining pairs to {DEMO_DATA}")
    spec = parse_spec(demo_spec(DEMO_DATA, f"demo-{time.strftime('%Y%m%d-%H%M%S')}"), source="demo spec")
    outcome = run_sweep(spec, yes=True)
    console.print(outcome.report())
    console.print(f"\nMLflow UI on these runs: {mlflow_ui_command(outcome.spec.tracking.uri or '')}")
    return 1 if outcome.errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="run the main job: a small GLMHA sweep on synthetic deraining data, tracked in MLflow")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(handler=_demo)
