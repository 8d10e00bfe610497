"""`restorch serve` runs the experiment service (orchestrator/service/app.py); `restorch serve token
create USER [--admin] | list [--user USER] | revoke ID` manages its API tokens."""
from __future__ import annotations

import argparse
import os

from orchestrator.service.dispatcher import Limits
from orchestrator.service.db import DEFAULT_URL
from orchestrator.service.policy import ServicePolicy
from orchestrator.run.submit import ADDRESS_ENVS, resolve_address

LOCAL_HEAD = "http://127.0.0.1:8265"


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.service.app import serve

    if args.max_running < 1 or args.max_running_per_user < 1:
        raise ValueError("--max-running and --max-running-per-user must be at least 1")
    # Ray's job client prefers $RAY_ADDRESS to its argument: resolve_address refuses a flag that disagrees with it.
    from_env = any(os.environ.get(name) for name in ADDRESS_ENVS)
    address = resolve_address(args.ray_address or (None if from_env else LOCAL_HEAD))
    tracking = args.tracking_uri or [uri for uri in [os.environ.get("MLFLOW_TRACKING_URI")] if uri]
    policy = ServicePolicy.create(args.storage_root, args.data_root, tracking, args.s3_endpoint_url)
    serve(args.db, address, Limits(args.max_running, args.max_running_per_user), policy, host=args.host,
          port=args.port, installed=args.installed)
    return 0


def _create_token(args: argparse.Namespace) -> int:
    from orchestrator.service.auth import create_token
    from orchestrator.service.db import open_database

    token = create_token(open_database(args.db), args.user, admin=args.admin)
    print(token)
    print(f"(token for {args.user}{' (admin)' if args.admin else ''}; shown only now, the service keeps only its hash)")
    return 0


def _list_tokens(args: argparse.Namespace) -> int:
    from orchestrator.service.auth import list_tokens
    from orchestrator.service.db import open_database

    tokens = list_tokens(open_database(args.db), args.user)
    for token in tokens:
        print(f"{token.id}  {token.user}{' (admin)' if token.admin else ''}  created {token.created_at:%Y-%m-%d %H:%M} UTC")
    if not tokens:
        print("no tokens" + (f" of {args.user}" if args.user else "") + ": restorch serve token create USER")
    return 0


def _revoke_token(args: argparse.Namespace) -> int:
    from orchestrator.service.auth import revoke_token
    from orchestrator.service.db import open_database

    token_id = args.token_id.split("_")[1] if args.token_id.startswith("rst_") else args.token_id
    if not revoke_token(open_database(args.db), token_id):
        raise ValueError(f"no token {token_id}: `restorch serve token list` shows the tokens' ids")
    print(f"revoked token {token_id}: requests with it now get 401")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the experiment service: an authenticated queue in front of a "
                                                "Ray cluster")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--db", default=DEFAULT_URL, help=f"the queue's database (default {DEFAULT_URL}; "
                                                         "postgresql+psycopg2://USER@HOST/DB for a team)")
    serve.add_argument("--ray-address", help=f"the Ray head's dashboard (default $RAY_ADDRESS, else {LOCAL_HEAD})")
    serve.add_argument("--max-running", type=int, default=Limits.max_running,
                       help=f"experiments running on the cluster at once (default {Limits.max_running})")
    serve.add_argument("--max-running-per-user", type=int, default=Limits.max_running_per_user,
                       help=f"experiments running at once for one user (default {Limits.max_running_per_user})")
    serve.add_argument("--installed", action="store_true",
                       help="jobs run the restorch installed on the cluster instead of this checkout's code")
    serve.add_argument("--storage-root", action="append", default=[], metavar="ROOT",
                       help="where experiments are stored: a folder every node mounts, or s3://BUCKET/PREFIX "
                            "(repeatable; required). Each user's experiments go to ROOT/USER/NAME")
    serve.add_argument("--data-root", action="append", default=[], metavar="ROOT",
                       help="a folder (or s3:// prefix) whose datasets specs may name (repeatable)")
    serve.add_argument("--tracking-uri", action="append", default=[], metavar="URI",
                       help="an MLflow server jobs may log to, the first by default (repeatable; default "
                            "$MLFLOW_TRACKING_URI): sweeps and ablations need one")
    serve.add_argument("--s3-endpoint-url", help="the S3-compatible endpoint of s3:// storage and data (default AWS)")
    serve.set_defaults(handler=_serve)

    token = serve.add_subparsers(dest="serve_command", metavar="token").add_parser("token", help="API tokens")
    commands = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    create = commands.add_parser("create", help="make a token for USER and print it (once)")
    create.add_argument("user", help="lower-case letters, digits, _ and - (it names the user's storage folder)")
    create.add_argument("--admin", action="store_true", help="the token sees and cancels every user's experiments")
    create.set_defaults(handler=_create_token)
    listing = commands.add_parser("list", help="the tokens' ids, users and roles (their secrets are not stored)")
    listing.add_argument("--user", help="only this user's")
    listing.set_defaults(handler=_list_tokens)
    revoke = commands.add_parser("revoke", help="delete a token: requests with it get 401 from then on")
    revoke.add_argument("token_id", metavar="ID", help="the id `token list` shows (or the whole token)")
    revoke.set_defaults(handler=_revoke_token)
    for command in (create, listing, revoke):
        # --db after the subcommand too; SUPPRESS keeps a --db given before `token` (a sub-parser's default would override it)
        command.add_argument("--db", default=argparse.SUPPRESS, help="the service's database (as for serve)")
