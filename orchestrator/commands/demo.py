"""`restorch demo`: the main job on the embedded defaults (`make demo`).

For now it profiles the model zoo: every registered model at its defaults, and Restormer with each
channel attention in place of CSA (the comparison of the GLMHA paper's Tables 1-4).
"""
from __future__ import annotations

import argparse
from typing import Any

from models import list_models
from models.attention import ATTENTIONS
from orchestrator.commands.models import profile_configs


def zoo_configs() -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [{"name": name} for name in list_models()]
    configs += [{"name": "restormer", "attention": name} for name in ATTENTIONS if name != "csa"]
    configs.append({"name": "mst_plus_plus", "attention": "glmha"})
    return configs


def _demo(args: argparse.Namespace) -> int:
    print(profile_configs(zoo_configs(), args.size))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="run the main job on the embedded defaults")
    demo.add_argument("--size", type=int, default=256, help="input size for profiling (default 256)")
    demo.set_defaults(handler=_demo)
