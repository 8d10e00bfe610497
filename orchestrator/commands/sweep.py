"""`restorch sweep spec.yaml [--yes] [--resume NAME]` and `restorch status [NAME]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.run.data_preflight import check_spec_data
from orchestrator.run.jobs import absolute_storage, on_cluster
from orchestrator.report.results import format_table
from orchestrator.commands import SPEC_HELP, VERBOSE_HELP
from orchestrator.console import console
from orchestrator.spec.recipes import spec_file
from orchestrator.spec.schema import DEFAULT_STORAGE, SpecError
from orchestrator.spec.load import load_spec


def mlflow_ui_command(uri: str) -> str:
    """How to look at the runs: the server's address, or `mlflow ui` on the SQLite store (relative
    when it is in the working directory)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    from orchestrator.tracking.store import sqlite_file

    database = sqlite_file(uri)
    if database is not None and database.parent == Path.cwd():
        uri = f"sqlite:///{database.name}"
    return f"mlflow ui --backend-store-uri {uri}"


def _sweep(args: argparse.Namespace) -> int:
    if (args.spec is None) == (args.resume is None):
        raise SpecError("give a spec file to run (or resume) a sweep, or --resume NAME for a sweep in storage")
    if args.resume:
        from orchestrator.run.sweep import read_stored_spec

        spec = read_stored_spec(f"{absolute_storage(args.storage)}/{args.resume}", args.endpoint_url)
        if spec is None:
            raise FileNotFoundError(f"no sweep {args.resume!r} in {args.storage}; `restorch status --storage "
                                    f"{args.storage}` lists the sweeps there")
    else:
        spec = load_spec(spec_file(args.spec))
    check_spec_data(spec, cluster=on_cluster(args.address))
    from orchestrator.run.sweep import run_sweep  # Ray, Tune, MLflow: seconds

    outcome = run_sweep(spec, address=args.address, yes=args.yes)
    console.print(outcome.report())
    console.print(f"MLflow: {mlflow_ui_command(outcome.spec.tracking.uri or '')}")
    return 1 if outcome.errors else 0


def _status(args: argparse.Namespace) -> int:
    from orchestrator.run.status import list_sweeps, sweep_trials

    if args.name is None:
        rows = list_sweeps(absolute_storage(args.storage), args.endpoint_url)
        print(format_table(rows, ["sweep", "trials", "pending", "running", "terminated", "error"]) if rows
              else f"no sweeps in {args.storage}")
        return 0
    spec, rows = sweep_trials(f"{absolute_storage(args.storage)}/{args.name}", args.endpoint_url)
    columns = ["trial", "tune", *spec.searched_keys(), "iteration", spec.search.metric, "mlflow"]
    print(format_table(rows, columns))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    storage_help = f"storage folder or URI of the sweeps (default {DEFAULT_STORAGE})"
    endpoint_help = "the S3-compatible store of an s3:// --storage (storage.endpoint_url of the spec), e.g. http://minio:9000"
    sweep = subparsers.add_parser("sweep", help="run a Ray Tune sweep of training jobs from a spec (resumes a stopped one)")
    sweep.add_argument("spec", nargs="?", metavar="SPEC|RECIPE", help=f"{SPEC_HELP}; a sweep of the same name in storage is resumed")
    sweep.add_argument("--resume", metavar="NAME", help="resume the sweep NAME from storage, with the spec it started with")
    sweep.add_argument("--storage", default=DEFAULT_STORAGE, help=f"with --resume: {storage_help}")
    sweep.add_argument("--endpoint-url", help=f"with --resume: {endpoint_help}")
    sweep.add_argument("--yes", action="store_true", help="launch even more than search.max_trials trials")
    sweep.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    sweep.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sweep.set_defaults(handler=_sweep)

    status = subparsers.add_parser("status", help="list sweeps, or one sweep's trials, with their Tune and MLflow states")
    status.add_argument("name", nargs="?", help="a sweep name (default: list all sweeps)")
    status.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    status.add_argument("--endpoint-url", help=endpoint_help)
    status.set_defaults(handler=_status)
