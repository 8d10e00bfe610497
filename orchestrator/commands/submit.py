"""`restorch submit spec.yaml --address http://HEAD:8265` runs a spec on a Ray cluster as a Ray job;
`restorch jobs list|logs|stop` manage the cluster's jobs (orchestrator/run/submit.py)."""
from __future__ import annotations

import argparse
from datetime import datetime

from orchestrator.commands import SPEC_HELP
from orchestrator.run.data_preflight import check_spec_data
from orchestrator.spec.recipes import spec_file
from orchestrator.spec.load import load_spec
from orchestrator.run.submit import KINDS, connect, follow, submit_spec

ADDRESS_HELP = "the head's dashboard, http://HEAD:8265 (default $RAY_ADDRESS)"


def _submit(args: argparse.Namespace) -> int:
    check_spec_data(load_spec(spec_file(args.spec)), cluster=True)  # the data paths this machine sees too
    client, job_id = submit_spec(spec_file(args.spec), kind=args.kind, address=args.address, installed=args.installed)
    print(f"submitted {job_id}")
    if not args.follow:
        print(f"follow it with: restorch jobs logs {job_id} --follow")
        return 0
    status = follow(client, job_id)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _time(milliseconds: int | None) -> str:
    return datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S") if milliseconds else "-"


def _list(args: argparse.Namespace) -> int:
    jobs = [job for job in connect(args.address).list_jobs() if job.submission_id]
    print(f"{'submission id':40} {'status':10} {'started':19}  entrypoint")
    for job in sorted(jobs, key=lambda job: job.start_time or 0):
        print(f"{job.submission_id:40} {job.status.value:10} {_time(job.start_time):19}  {job.entrypoint}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        print(f"{args.job_id}: {follow(client, args.job_id)}")
    else:
        print(client.get_job_logs(args.job_id), end="")
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = connect(args.address).stop_job(args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser("submit", help="run a spec on a Ray cluster (Ray Jobs API)")
    submit.add_argument("spec", metavar="SPEC|RECIPE", help=f"{SPEC_HELP}; its data paths are paths on the cluster's nodes")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--kind", choices=KINDS,
                        help="the restorch command the job runs (default: sweep for a spec with a search space, else train)")
    submit.add_argument("--installed", action="store_true",
                        help="run the restorch installed on the cluster instead of shipping this checkout's code")
    submit.add_argument("--follow", action="store_true", help="print the job's logs until it ends; exit 1 unless it succeeded")
    submit.set_defaults(handler=_submit)

    jobs = subparsers.add_parser("jobs", help="list, read and stop the jobs of a Ray cluster")
    commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    listing = commands.add_parser("list", help="submitted jobs and their status")
    listing.set_defaults(handler=_list)
    logs = commands.add_parser("logs", help="a job's output")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=_logs)
    stop = commands.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.set_defaults(handler=_stop)
    for command in (listing, logs, stop):
        command.add_argument("--address", help=ADDRESS_HELP)
