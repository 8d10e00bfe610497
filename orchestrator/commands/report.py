"""`restorch report NAME|RUN_ID`: rebuild an ablation's paper-style report, or a sweep's (trials, importance,
two-way table, Pareto front), from MLflow alone."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orchestrator.console import console
from workloads.outputs import check_output_folder

DEFAULT_REPORTS = "reports"


def print_report(folder: Path) -> None:
    """The Markdown table of the report in `folder`, and where its files are."""
    from orchestrator.tracking.keys import MARKDOWN_FILE

    console.print((folder / MARKDOWN_FILE).read_text())
    console.print(f"report: {folder} (table.csv, table.md, table.tex, report.html, plots)")


def _report(args: argparse.Namespace) -> int:
    """An ablation's report, or a sweep's (the parent run has no ablation tag)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report.build import build_report, write_report
    from orchestrator.report.sweep import find_parent_run
    from orchestrator.tracking.keys import ABLATION_TAG
    from orchestrator.tracking.store import resolve_uri

    client = MlflowClient(resolve_uri(args.tracking_uri))
    parent = find_parent_run(client, args.ablation)
    if ABLATION_TAG not in parent.data.tags:
        return _sweep_report(client, parent, args)
    report = build_report(client, parent.info.run_id)
    folder = args.out or Path(DEFAULT_REPORTS) / report.name
    check_output_folder(folder, option="--out", overwrite=args.overwrite)
    print_report(write_report(report, folder))
    return 0


def _sweep_report(client: Any, parent: Any, args: argparse.Namespace) -> int:
    from orchestrator.report.sweep import build_sweep_report
    from orchestrator.report.sweep_page import REPORT_FILE, write_sweep_report

    report = build_sweep_report(client, parent)
    folder = args.out or Path(DEFAULT_REPORTS) / report.name
    check_output_folder(folder, option="--out", overwrite=args.overwrite)
    write_sweep_report(report, folder)
    console.print((folder / REPORT_FILE).read_text())
    console.print(f"report: {folder} ({', '.join(sorted(path.name for path in folder.iterdir()))})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser("report", help="rebuild an ablation's or a sweep's report (tables, importance, "
                                                  "plots, HTML) from MLflow alone")
    report.add_argument("ablation", metavar="NAME|RUN_ID", help="the ablation's or sweep's name (its latest run) or "
                                                                "parent run id")
    report.add_argument("--out", type=Path, help=f"report folder, new or empty (default {DEFAULT_REPORTS}/NAME)")
    report.add_argument("--overwrite", action="store_true", help="write into a --out folder that is not empty "
                                                                 "(replacing a report there)")
    report.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    report.set_defaults(handler=_report)
