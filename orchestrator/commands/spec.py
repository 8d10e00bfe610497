"""`restorch spec schema` (JSON schema of experiment specs) and `restorch spec check FILE`."""
from __future__ import annotations

import argparse
import json

from orchestrator.commands import SPEC_HELP, command_group
from orchestrator.spec.recipes import spec_file
from orchestrator.spec.schema import json_schema
from orchestrator.spec.load import load_spec


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    spec = load_spec(spec_file(args.spec))
    for domain in spec.search_space:
        when = f" (when {domain.parent} is {domain.when!r})" if domain.parent else ""
        print(f"search {domain.key}: {domain.kind} {domain.values}{when}")
    count = spec.trial_count()
    print(f"{args.spec}: valid; {count} trial(s) ({spec.search.algorithm} search, {spec.search.scheduler} scheduler)")
    if count > spec.search.max_trials:
        print(f"note: more than search.max_trials = {spec.search.max_trials}: `restorch sweep` asks for --yes")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(subparsers, "spec", "experiment spec schema and validation")
    commands.add_parser("schema", help="print the JSON schema of experiment specs (for editor completion)").set_defaults(handler=_schema)
    check = commands.add_parser("check", help="validate a spec and print how many trials it launches")
    check.add_argument("spec", metavar="SPEC|RECIPE", help=SPEC_HELP)
    check.set_defaults(handler=_check)
