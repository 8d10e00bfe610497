"""Command groups of the `restorch` CLI, one module each (see orchestrator/cli.py).

COMMANDS maps each top-level command to the module that registers it, so that the CLI imports only
the module of the command being run (the others pull in torch, MLflow, Ray, scipy...: seconds).
"""
import argparse
import importlib
from types import ModuleType

COMMANDS = {
    "demo": "demo", "bench": "bench", "models": "models", "data": "data", "evaluate": "evaluate", "train": "train",
    "sweep": "sweep", "status": "sweep", "ablate": "ablate", "report": "report", "spec": "spec", "submit": "submit",
    "jobs": "submit", "tracking": "tracking", "register": "registry", "registry": "registry", "restore": "registry",
    "serve": "serve", "recipes": "recipes",
}
SPEC_HELP = "experiment spec (YAML), or a recipe's name (`restorch recipes` lists them)"
VERBOSE_HELP = "also print what Ray, MLflow and the workers print (else in the log whose path is printed)"
QUIET_MLFLOW_HELP = "also print what MLflow prints (else in a log whose path is printed)"


def command_modules(command: str | None = None) -> list[ModuleType]:
    """The module registering `command`, or every command module (for --help and unknown commands)."""
    names = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    return [importlib.import_module(f"orchestrator.commands.{name}") for name in names]


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The subcommands of `restorch NAME SUBCOMMAND ...` (one is required; `args.{name}_command` names it)."""
    group = subparsers.add_parser(name, help=help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")
