"""A shared MLflow tracking server for a team or a cluster (`restorch tracking up`).

Runs, metrics and the model registry live in a database (PostgreSQL); artifacts (models, specs,
results) in S3 under `--artifacts`. The server proxies artifacts: clients send them to the server,
which alone needs S3 access (the standard AWS chain: environment, ~/.aws, instance profile).
Specs point at it with `tracking.uri: http://HOST:PORT` (or $MLFLOW_TRACKING_URI).

One worker process and no job execution: about 0.5 GB instead of 2+ GB, ample for a team's traffic.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

from orchestrator.spec.schema import SpecError

POSTGRES_DRIVER = "postgresql+psycopg2"  # psycopg2-binary is a restorch dependency; plain postgresql:// would need psycopg 3
CONNECT_TIMEOUT_S = 10


def backend_uri(uri: str) -> str:
    """The SQLAlchemy URI of the backend store, with PostgreSQL's driver made explicit."""
    scheme, sep, rest = uri.partition("://")
    return f"{POSTGRES_DRIVER}://{rest}" if sep and scheme in ("postgresql", "postgres") else uri


def check_backend(uri: str) -> None:
    """Connect once, so that a database that is down or refuses us fails here, in one line."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    url = sqlalchemy.engine.make_url(uri)
    shown = url.render_as_string(hide_password=True)
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect():
            pass
    except (SQLAlchemyError, ModuleNotFoundError) as error:
        reason = str(error).strip().splitlines()[0]
        raise SpecError(f"--backend {shown}: cannot connect ({reason}); start the database or fix the URI") from None
    engine.dispose()


def server_command(backend: str, artifacts: str, *, host: str, port: int, allowed_hosts: str | None) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", artifacts, "--serve-artifacts",
               "--host", host, "--port", str(port), "--workers", "1"]
    return command + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


def server_env(endpoint_url: str | None) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
    return env


def serve(backend: str, artifacts: str, *, host: str, port: int, endpoint_url: str | None = None,
          allowed_hosts: str | None = None) -> NoReturn:
    """Check the database, then become the MLflow server (this process is replaced: a service
    manager's signals reach the server itself)."""
    backend = backend_uri(backend)
    check_backend(backend)
    print(f"MLflow tracking server on http://{host}:{port} (artifacts: {artifacts}); point specs at it with "
          f"tracking.uri: http://{host}:{port}", flush=True)
    command = server_command(backend, artifacts, host=host, port=port, allowed_hosts=allowed_hosts)
    os.execve(command[0], command, server_env(endpoint_url))
