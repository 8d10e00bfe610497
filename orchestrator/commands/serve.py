"""`restorch serve` runs the experiment service (orchestrator/service.py); `restorch serve token
create USER [--admin]` makes an API token for it."""
from __future__ import annotations

import argparse
import os

from orchestrator.dispatcher import Limits
from orchestrator.service_db import DEFAULT_URL
from orchestrator.submit import ADDRESS_ENVS, resolve_address

LOCAL_HEAD = "http://127.0.0.1:8265"


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.service import serve

    if args.max_running < 1 or args.max_running_per_user < 1:
        raise ValueError("--max-running and --max-running-per-user must be at least 1")
    # Ray's job client prefers $RAY_ADDRESS to its argument: resolve_address refuses a flag that disagrees with it.
    from_env = any(os.environ.get(name) for name in ADDRESS_ENVS)
    address = resolve_address(args.ray_address or (None if from_env else LOCAL_HEAD))
    serve(args.db, address, Limits(args.max_running, args.max_running_per_user), host=args.host, port=args.port,
          installed=args.installed)
    return 0


def _create_token(args: argparse.Namespace) -> int:
    from orchestrator.auth import create_token
    from orchestrator.service_db import open_database

    token = create_token(open_database(args.db), args.user, admin=args.admin)
    print(token)
    print(f"(token for {args.user}{' (admin)' if args.admin else ''}; shown only now, the service keeps only its hash)")
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
    serve.set_defaults(handler=_serve)

    token = serve.add_subparsers(dest="serve_command", metavar="token").add_parser("token", help="API tokens")
    create = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND").add_parser(
        "create", help="make a token for USER and print it (once)")
    create.add_argument("user")
    create.add_argument("--admin", action="store_true", help="the token sees and cancels every user's experiments")
    # --db after `create` too; SUPPRESS keeps a --db given before `token` (a sub-parser's default would override it)
    create.add_argument("--db", default=argparse.SUPPRESS, help="the service's database (as for serve)")
    create.set_defaults(handler=_create_token)
