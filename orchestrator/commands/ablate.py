"""`restorch ablate spec.yaml|RECIPE`: run an ablation study (orchestrator/spec/ablation.py) and write its report."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.commands import VERBOSE_HELP
from orchestrator.commands.report import DEFAULT_REPORTS, print_report
from orchestrator.console import console
from orchestrator.run.data_preflight import check_spec_data
from orchestrator.run.jobs import on_cluster
from orchestrator.spec.recipes import spec_file
from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import load_spec
from workloads.outputs import check_output_folder


def _ablate(args: argparse.Namespace) -> int:
    spec = load_spec(spec_file(args.spec))
    if spec.ablation is None:
        raise SpecError(f"{args.spec} has no ablation: section; `restorch sweep` runs other specs")
    folder = args.out or Path(DEFAULT_REPORTS) / spec.name
    check_output_folder(folder, option="--out", overwrite=args.overwrite)
    check_spec_data(spec, cluster=on_cluster(args.address))
    from mlflow.tracking import MlflowClient  # these import Ray, Tune and MLflow: seconds

    from orchestrator.run.ablation_run import run_ablation
    from orchestrator.report.build import build_report, publish_report, write_report

    run = run_ablation(spec, address=args.address, yes=args.yes)
    client = MlflowClient(run.uri)
    report = build_report(client, run.parent_run_id)
    write_report(report, folder)
    publish_report(client, run.parent_run_id, folder)
    print_report(folder)
    console.print(f"also logged to MLflow run {run.parent_run_id} (artifacts report/); rebuild anywhere with "
                  f"`restorch report {spec.name}`")
    return 1 if run.errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    ablate = subparsers.add_parser("ablate", help="run an ablation study from a spec's ablation: section, with its report")
    ablate.add_argument("spec", metavar="SPEC|RECIPE", help="experiment spec with an ablation: section, or a recipe's "
                                                            "name (glmha-table9-levels; `restorch recipes` lists them)")
    ablate.add_argument("--out", type=Path, help=f"report folder, new or empty (default {DEFAULT_REPORTS}/NAME)")
    ablate.add_argument("--overwrite", action="store_true", help="write the report into a --out folder that is not "
                                                                 "empty (replacing a report there)")
    ablate.add_argument("--yes", action="store_true", help="launch even more than search.max_trials trials")
    ablate.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    ablate.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    ablate.set_defaults(handler=_ablate)
