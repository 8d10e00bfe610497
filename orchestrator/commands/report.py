"""`restorch report NAME|RUN_ID`: rebuild an ablation's paper-style report from MLflow alone."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.console import console
from workloads.outputs import check_output_folder

DEFAULT_REPORTS = "reports"


def print_report(folder: Path) -> None:
    """The Markdown table of the report in `folder`, and where its files are."""
    from orchestrator.tracking.keys import MARKDOWN_FILE

    console.print((folder / MARKDOWN_FILE).read_text())
    console.print(f"report: {folder} (table.csv, table.md, table.tex, report.html, plots)")


def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.report.build import build_report, write_report
    from orchestrator.tracking.store import resolve_uri

    report = build_report(MlflowClient(resolve_uri(args.tracking_uri)), args.ablation)
    folder = args.out or Path(DEFAULT_REPORTS) / report.name
    check_output_folder(folder, option="--out", overwrite=args.overwrite)
    print_report(write_report(report, folder))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser("report", help="rebuild an ablation's report (tables, plots, HTML) from MLflow alone")
    report.add_argument("ablation", metavar="NAME|RUN_ID", help="the ablation's name (its latest run) or parent run id")
    report.add_argument("--out", type=Path, help=f"report folder, new or empty (default {DEFAULT_REPORTS}/NAME)")
    report.add_argument("--overwrite", action="store_true", help="write into a --out folder that is not empty "
                                                                 "(replacing a report there)")
    report.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    report.set_defaults(handler=_report)
