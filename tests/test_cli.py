"""The CLI imports only the module of the command it runs; the command map must match what the
modules register."""
from __future__ import annotations

import argparse
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


def test_a_light_command_does_not_import_torch_or_ray():
    result = subprocess.run([sys.executable, "-c", "import sys\nfrom orchestrator.cli import build_parser\n"
                             "build_parser('spec')\nprint(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
