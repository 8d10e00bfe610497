"""`restorch models list`, `restorch models profile NAME --set key=value --size 256` and
`restorch models zoo` (every model, and Restormer with each channel attention: the comparison of the
GLMHA paper's Tables 1-4)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.commands import command_group

if TYPE_CHECKING:
    from models.profile import ModelProfile


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["attention=glmha", "glmha.kv_reduction=0.5"]` -> nested config dict; values are YAML scalars/lists."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value (e.g. glmha.alpha=0.6), got {pair!r}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {pair!r}: {part!r} is already set to a value, not a mapping")
        node[leaf] = yaml.safe_load(raw)
    return config


def format_profile_table(rows: list[tuple[str, ModelProfile]]) -> str:
    width = max(len("model"), *(len(name) for name, _ in rows))
    header = f"{'model':<{width}} {'params (M)':>11} {'conv GMACs':>11} {'total GMACs':>12}"
    lines = [header, "-" * len(header)]
    for name, profile in rows:
        lines.append(f"{name:<{width}} {profile.params / 1e6:>11.3f} {profile.conv_gmacs:>11.2f} {profile.total_gmacs:>12.2f}")
    return "\n".join(lines)


def describe(config: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in config.items() if k != "name")
    return f"{config['name']}({options})" if options else config["name"]


def profile_configs(configs: list[dict[str, Any]], size: int) -> str:
    from models import build_model
    from models.profile import profile_model

    rows = [(describe(config), profile_model(build_model(config), size=size)) for config in configs]
    note = (
        f"input 1xCx{size}x{size}; conv GMACs = conv/linear layers only (the papers' 'FLOPs' column), "
        "total GMACs = with attention matmuls"
    )
    return f"{format_profile_table(rows)}\n{note}"


def zoo_configs() -> list[dict[str, Any]]:
    from models import list_models
    from models.attention import ATTENTIONS

    configs: list[dict[str, Any]] = [{"name": name} for name in list_models()]
    configs += [{"name": "restormer", "attention": name} for name in ATTENTIONS if name != "csa"]
    configs.append({"name": "mst_plus_plus", "attention": "glmha"})
    return configs


def _list(args: argparse.Namespace) -> int:
    from models import list_models

    for name, defaults in list_models().items():
        print(f"{name}:")
        print("  " + yaml.safe_dump(defaults, default_flow_style=None, sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def _profile(args: argparse.Namespace) -> int:
    config = {"name": args.name, **parse_overrides(args.set)}
    print(profile_configs([config], args.size))
    return 0


def _zoo(args: argparse.Namespace) -> int:
    print(profile_configs(zoo_configs(), args.size))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(subparsers, "models", "list and profile the registered models")
    commands.add_parser("list", help="registered models and their default options").set_defaults(handler=_list)
    profile = commands.add_parser("profile", help="params, conv GMACs and total GMACs of a model")
    profile.add_argument("name", help="registered model name (see `restorch models list`)")
    profile.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option, e.g. glmha.kv_reduction=0.5")
    profile.add_argument("--size", type=int, default=256, help="input height and width (default 256)")
    profile.set_defaults(handler=_profile)
    zoo = commands.add_parser("zoo", help="profile every model, and Restormer with each channel attention")
    zoo.add_argument("--size", type=int, default=256, help="input height and width (default 256)")
    zoo.set_defaults(handler=_zoo)
