"""`restorch train spec.yaml`: one training job (Ray Train + DeepSpeed) from an experiment spec."""
from __future__ import annotations

import argparse

from orchestrator.run.data_preflight import check_spec_data
from orchestrator.run.jobs import on_cluster, run_job
from orchestrator.commands import SPEC_HELP
from orchestrator.spec.recipes import spec_file
from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import load_spec


def _train(args: argparse.Namespace) -> int:
    spec = load_spec(spec_file(args.spec))
    if spec.search_space:
        keys = ", ".join(d.key for d in spec.search_space)
        raise SpecError(f"{args.spec} has search-space entries ({keys}): run it with `restorch sweep`, or fix the values")
    check_spec_data(spec, cluster=on_cluster(args.address))
    result, run_id = run_job(spec, address=args.address)
    if result.error:
        print(f"restorch train: the job failed: {result.error}" + (f" (MLflow run {run_id})" if run_id else ""))
        return 1
    metrics = result.metrics or {}
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"final metrics: {shown}")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint.path} (consolidated weights: model.pt inside)")
    if run_id:
        print(f"MLflow run {run_id}; register it with `restorch register {run_id} --name NAME`")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="run one training job from a spec")
    train.add_argument("spec", metavar="SPEC|RECIPE", help=SPEC_HELP)
    train.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    train.set_defaults(handler=_train)
