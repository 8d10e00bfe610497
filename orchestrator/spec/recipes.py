"""Recipes: experiment specs shipped with restorch (package data, workloads/recipes/*.yaml), the papers'
ablations at small scale. Every command that takes a spec takes a recipe's name instead
(`restorch spec check glmha-table7-kv-reduction`): each resolves its argument with `spec_file`.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from orchestrator.spec.schema import SpecError


def recipes() -> dict[str, Path]:
    """The recipes shipped with restorch by name."""
    folder = Path(str(resources.files("workloads") / "recipes"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def spec_file(reference: str | Path) -> Path:
    """The spec file `reference`, or else the recipe it names (glmha-table9-levels, .yaml optional)."""
    path = Path(reference)
    if path.is_file():
        return path
    known = recipes()
    name = str(reference).removesuffix(".yaml")
    if name in known:
        return known[name]
    raise SpecError(f"{reference}: no such spec file, nor a recipe; recipes: {', '.join(known) or 'none installed'} "
                    "(`restorch recipes` describes them)")


def summary(path: Path) -> str:
    """The first sentence of the recipe's opening comment (its comment lines up to a blank or indented one)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("# ") or line.startswith("#  "):
            break
        lines.append(line[2:])
    text = " ".join(lines)
    match = re.match(r"(.+?\.)(\s|$)", text)
    return match[1] if match else text
