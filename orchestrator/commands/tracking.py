"""`restorch tracking up`: a shared MLflow tracking server (orchestrator/tracking/server.py)."""
from __future__ import annotations

import argparse
from typing import NoReturn

from orchestrator.tracking.server import serve


def _up(args: argparse.Namespace) -> NoReturn:
    serve(args.backend, args.artifacts, host=args.host, port=args.port, endpoint_url=args.endpoint_url,
          allowed_hosts=args.allowed_hosts)


def register(subparsers: argparse._SubParsersAction) -> None:
    tracking = subparsers.add_parser("tracking", help="a shared MLflow tracking server")
    commands = tracking.add_subparsers(dest="tracking_command", required=True, metavar="SUBCOMMAND")
    up = commands.add_parser("up", help="run the MLflow server in the foreground (as a service: clusters/README.md)")
    up.add_argument("--backend", required=True,
                    help="database of runs and registered models, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow")
    up.add_argument("--artifacts", required=True, help="where artifacts go, e.g. s3://BUCKET/mlflow")
    up.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    up.add_argument("--port", type=int, default=5000, help="default 5000")
    up.add_argument("--endpoint-url", help="S3-compatible store for the artifacts (MinIO), e.g. http://minio:9000")
    up.add_argument("--allowed-hosts", help="Host names clients use, when not localhost or a private IP "
                                            "(MLflow's DNS-rebinding protection), e.g. mlflow.example.com")
    up.set_defaults(handler=_up)
