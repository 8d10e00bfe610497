"""Every package the code imports is declared in pyproject.toml: the packages' imports among the
runtime dependencies, the tests' imports among the runtime and `test` dependencies."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "workloads", "orchestrator")


def imported_modules(folders: list[Path]) -> dict[str, str]:
    """Top-level module -> a file importing it, for every absolute import in the folders' Python files
    (in functions too: the code imports heavy packages lazily)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared(groups: list[list[str]]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))
            for group in groups for requirement in group}


def undeclared(modules: dict[str, str], distributions: set[str], own: set[str]) -> list[str]:
    """Imported third-party modules none of whose installing distributions is declared."""
    installed_by = packages_distributions()
    missing = []
    for module, where in sorted(modules.items()):
        if module in sys.stdlib_module_names or module in own:
            continue
        providers = {normalized(name) for name in installed_by.get(module, [])}
        if not providers & distributions:
            missing.append(f"{module} (imported in {where}; installed by {sorted(providers) or 'nothing'})")
    return missing


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = declared([project["dependencies"]])
    with_tests = runtime | declared([project["optional-dependencies"]["test"]])
    own = set(PACKAGES)

    missing = undeclared(imported_modules([ROOT / package for package in PACKAGES]), runtime, own)
    assert not missing, "declare in [project] dependencies: " + "; ".join(missing)
    test_helpers = {path.stem for path in (ROOT / "tests").glob("*.py")}  # conftest, servers
    missing = undeclared(imported_modules([ROOT / "tests"]), with_tests, own | test_helpers)
    assert not missing, "declare in [project.optional-dependencies] test: " + "; ".join(missing)
