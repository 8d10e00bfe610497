"""Running restorch on a Ray cluster through the Ray Jobs API (the head's dashboard port, 8265).

`submit_spec` checks the spec here, then submits `python -m orchestrator.cli <kind> <spec>` as a Ray
job. The job's runtime environment carries the spec file (its working directory) and, unless
`installed=True`, this checkout's restorch packages (models, workloads, orchestrator), which then
take precedence on every node over a restorch installed there: the cluster needs only restorch's
dependencies (clusters/ installs them), and code edited here runs there without rebuilding nodes.
The spec is checked first (orchestrator/run/remote.py: storage and tracking every node shares), and the
job's environment carries this side's MLflow and S3 variables.

The address comes from `--address` or $RAY_ADDRESS (as for `ray job submit`). A head with token
authentication (clusters/, and `ray start` where ~/.ray/auth_token exists) also needs the token on
this side: RAY_AUTH_MODE=token with the token in ~/.ray/auth_token or $RAY_AUTH_TOKEN.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, TextIO

from orchestrator.run.remote import check_for_cluster, forwarded_env
from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import load_spec

KINDS = ("train", "sweep", "ablate")
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's client reads these before its argument
PACKAGES = ("models", "workloads", "orchestrator")  # found, not imported: `models` imports torch
EXCLUDES = ["__pycache__", "*.pyc"]
CONNECT_TIMEOUT_S = 10


class ClusterError(ValueError):
    """The cluster cannot be reached or refused a request; the message says what to do."""


def resolve_address(address: str | None) -> str:
    """The head's dashboard address: `address`, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS."""
    from_env = next((os.environ[name] for name in ADDRESS_ENVS if os.environ.get(name)), None)
    if address and from_env and address.rstrip("/") != from_env.rstrip("/"):
        raise ClusterError(f"--address {address} and ${'/$'.join(ADDRESS_ENVS)} = {from_env} disagree (Ray's job "
                           "client would use the variable); unset it or pass the same address")
    address = (address or from_env or "").rstrip("/")
    if not address:
        raise ClusterError("no cluster given: pass --address http://HEAD:8265 (the head's dashboard) or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def connect(address: str | None) -> Any:
    """A `JobSubmissionClient` for the head at `address`, after checking that the head answers."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        requests.get(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as error:
        raise ClusterError(f"no Ray head answers at {url} ({type(error).__name__}): start the cluster "
                           "(clusters/README.md) or fix --address / $RAY_ADDRESS") from None
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as error:
        raise ClusterError(f"the Ray head at {url} requires its token: set RAY_AUTH_MODE=token and put the head's "
                           f"token (`ray get-auth-token` there) in ~/.ray/auth_token or $RAY_AUTH_TOKEN ({error})") from None


def runtime_env(spec_dir: Path, *, installed: bool) -> dict[str, Any]:
    """The job's runtime environment: the spec's folder, this checkout's code (unless `installed`) and
    the tracking and S3 variables set here (orchestrator/run/remote.py)."""
    env: dict[str, Any] = {"working_dir": str(spec_dir), "excludes": EXCLUDES}
    forwarded = forwarded_env()
    if forwarded:
        env["env_vars"] = forwarded
    if not installed:
        env["py_modules"] = [str(Path(importlib.util.find_spec(package).origin).parent) for package in PACKAGES]
    return env


def submit_spec(spec_file: str | Path, *, kind: str | None, address: str | None, installed: bool = False,
                submission_id: str | None = None) -> tuple[Any, str]:
    """Submit `restorch <kind> <spec>` to the cluster (kind None: sweep if the spec has a search space,
    else train); returns the client and the job's submission id. With `submission_id`, submitting is
    idempotent: when the cluster has a job of that id already, that job is the one returned."""
    spec_file = Path(spec_file)
    spec = load_spec(spec_file)
    kind = kind or ("sweep" if spec.search_space else "train")
    if kind not in KINDS:
        raise SpecError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    check_for_cluster(spec, tracked=kind != "train")
    client = connect(address)
    job_id = submission_id or f"restorch-{kind}-{spec.name}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="restorch-submit-") as spec_dir:
        shutil.copy(spec_file, Path(spec_dir) / spec_file.name)
        try:
            client.submit_job(
                entrypoint=f"python -m orchestrator.cli {kind} {spec_file.name}",
                runtime_env=runtime_env(Path(spec_dir), installed=installed),
                submission_id=job_id,
                metadata={"restorch_kind": kind, "restorch_spec": spec.name},
            )
        except RuntimeError:  # Ray refuses an id it has: an earlier submission of this id got through
            if submission_id is None or not has_job(client, job_id):
                raise
    return client, job_id


def has_job(client: Any, job_id: str) -> bool:
    return any(job.submission_id == job_id for job in client.list_jobs())


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)
