"""The CLI imports only the module of the command it runs, and no heavy library for --help; the
command map matches what the modules register; every spec command takes a recipe's name; the README
names every model and attention."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from orchestrator.cli import build_parser, main
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
    from orchestrator.run import benchmarks
    from orchestrator.commands.bench import DTYPES

    assert set(DTYPES) == set(benchmarks.DTYPES)


def test_recipes_are_listed_and_every_spec_command_takes_a_recipe_name(tmp_path, monkeypatch, capsys):
    from orchestrator.spec.recipes import recipes

    monkeypatch.chdir(tmp_path)  # the recipes' relative data folders do not exist here
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name}  " in listed for name in recipes())
    assert main(["spec", "check", "glmha-table7-kv-reduction"]) == 0
    assert "valid; 5 trial(s)" in capsys.readouterr().out
    # each command got past finding the spec: the errors are about its content
    expected = {"sweep": "data.train: data/rain-mini/train is not a folder", "ablate": "data.train: data/rain-mini",
                "train": "has search-space entries", "submit": "data.train: data/rain-mini/train is relative"}
    for command, error in expected.items():
        assert main([command, "glmha-table7-kv-reduction"]) == 2
        assert error in capsys.readouterr().err
    assert main(["spec", "check", "no-such-recipe"]) == 2
    assert "no-such-recipe: no such spec file, nor a recipe; recipes: glmha-table1-mst" in capsys.readouterr().err


def test_the_readme_tables_name_every_model_and_attention():
    from models import list_models
    from models.attention import ATTENTIONS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    in_tables = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.MULTILINE))
    assert set(list_models()) - in_tables == set()
    assert set(ATTENTIONS) - in_tables == set()
