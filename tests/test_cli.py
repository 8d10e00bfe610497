"""The CLI imports only the module of the command it runs; the command map must match what the
modules register."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from orchestrator.cli import build_parser
from orchestrator.commands import COMMANDS


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return next(set(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_command_map_matches_the_registered_commands():
    assert _commands(build_parser()) == set(COMMANDS)
    for command in COMMANDS:
        assert command in _commands(build_parser(command))


HEAVY_MODULES = ("torch", "ray", "mlflow", "scipy")
HELP_IMPORTS = f"""
import contextlib, io, json, sys
from orchestrator.cli import main
from orchestrator.commands import COMMANDS
found = {{}}
for command in ["", *COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([command, "--help"] if command else ["--help"])
    found[command or "restorch"] = [name for name in {HEAVY_MODULES!r} if name in sys.modules]
print(json.dumps(found))
"""


def test_help_imports_no_torch_ray_mlflow_or_scipy():
    """`restorch --help` and every `restorch COMMAND --help` answer at once: the heavy libraries are
    imported by the handlers that use them, never to build a parser."""
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, check=True, timeout=120)
    found = json.loads(result.stdout)
    assert set(found) == {"restorch", *COMMANDS}
    # imports accumulate in the one process: the first command listing a module is the one importing it
    assert {command: modules for command, modules in found.items() if modules} == {}


def test_choices_named_in_the_cli_match_the_modules_they_stand_for():
    from orchestrator import benchmarks
    from orchestrator.commands.bench import DTYPES

    assert set(DTYPES) == set(benchmarks.DTYPES)
