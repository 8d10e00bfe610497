"""`restorch recipes`: the specs shipped with restorch (orchestrator/spec/recipes.py), which every command
taking a spec accepts by name."""
from __future__ import annotations

import argparse

from orchestrator.spec.recipes import recipes, summary
from orchestrator.spec.load import load_spec


def _recipes(args: argparse.Namespace) -> int:
    known = recipes()
    width = max(map(len, known))
    for name, path in known.items():
        spec = load_spec(path)
        kind = "ablation" if spec.ablation else "sweep" if spec.search_space else "training"
        print(f"{name:<{width}}  {kind}, {spec.trial_count()} trial(s): {summary(path)}")
    print(f"\nevery command that takes a spec takes a recipe's name: restorch spec check NAME, restorch ablate NAME "
          f"(files in {next(iter(known.values())).parent})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("recipes", help="list the specs shipped with restorch (the papers' ablations, small scale)"
                          ).set_defaults(handler=_recipes)
