"""`restorch register`, `restorch registry import|promote|list|show|compare`, `restorch restore`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.commands import QUIET_MLFLOW_HELP
from orchestrator.console import quiet_mlflow
from workloads.tasks import TASKS

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient


def _describe(version: ModelVersion, aliases: list[str]) -> str:
    alias_text = " ".join(f"@{a}" for a in aliases)
    return f"{version.name} v{version.version} {alias_text}".rstrip()


def _aliases_of(client: MlflowClient, name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _register(args: argparse.Namespace) -> int:
    from orchestrator.tracking import model_registry

    with quiet_mlflow("register"):
        version = model_registry.register(args.source, args.name, metric=args.metric, mode=args.mode,
                                          uri=args.tracking_uri)
    print(f"registered {version.name} v{version.version} from run {version.run_id}: models:/{version.name}/{version.version}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from orchestrator.commands.models import parse_overrides
    from orchestrator.tracking import model_registry
    from orchestrator.tracking.keys import SOURCE_SHA256_TAG

    options = parse_overrides(args.set)
    with quiet_mlflow("registry-import"):
        version = model_registry.import_official(args.arch, args.file, args.name, task=args.task, options=options,
                                                 uri=args.tracking_uri)
    print(f"imported {args.file} ({args.arch}, sha256 {version.tags[SOURCE_SHA256_TAG]}) as {version.name} "
          f"v{version.version}: models:/{version.name}/{version.version}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from orchestrator.tracking import model_registry

    version = model_registry.promote(model_registry.client_for(args.tracking_uri), args.name, args.version, args.alias)
    print(f"{version.name} v{version.version} is now @{args.alias}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from orchestrator.tracking import model_registry
    from orchestrator.tracking.keys import PARAMS_M, TASK_TAG, VALIDATION_PREFIX
    from orchestrator.tracking.store import model_versions

    client = model_registry.client_for(args.tracking_uri)
    names = model_registry.registered_names(client)
    if not names:
        print("no registered models")
    for name in names:
        aliases = _aliases_of(client, name)
        for version in sorted(model_versions(client, name), key=lambda v: int(v.version)):
            tags = version.tags
            print(f"{_describe(version, aliases.get(str(version.version), [])):<40} task {tags.get(TASK_TAG, '?'):<18} "
                  f"psnr {tags.get(VALIDATION_PREFIX + 'psnr', '-'):>8}  params {tags.get(PARAMS_M, '-')} M")
    return 0


def _show(args: argparse.Namespace) -> int:
    from orchestrator.tracking import model_registry

    client = model_registry.client_for(args.tracking_uri)
    version = model_registry.get_version(client, model_registry.ModelReference.parse(args.reference))
    print(_describe(version, _aliases_of(client, version.name).get(str(version.version), [])))
    for key, value in sorted(version.tags.items()):
        print(f"  {key}: {value}")
    print()
    print(version.description or "")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """The version tags, model options (the runs' model.* params) and final metrics in which two versions
    differ, side by side; what they share is counted, not listed."""
    from orchestrator.tracking import model_registry
    from orchestrator.tracking.keys import MODEL_PREFIX

    client = model_registry.client_for(args.tracking_uri)
    versions = [model_registry.get_version(client, model_registry.ModelReference(args.name, version=v))
                for v in (args.v1, args.v2)]
    runs = [client.get_run(version.run_id) for version in versions]
    groups = {
        "tag": [dict(version.tags) for version in versions],
        "model option": [{k.removeprefix(MODEL_PREFIX): v for k, v in run.data.params.items() if k.startswith(MODEL_PREFIX)}
                         for run in runs],
        "metric": [{k: f"{v:.6g}" for k, v in run.data.metrics.items()} for run in runs],
    }
    rows, same = [], []
    for group, (left, right) in groups.items():
        differing = [key for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
        rows += [(f"{group} {key}", left.get(key, "-"), right.get(key, "-")) for key in differing]
        same.append(f"{len(set(left) | set(right)) - len(differing)} {group}s")
    width = max([len("differs"), *(len(row[0]) for row in rows)])
    print(f"{'differs':<{width}}  {'v' + str(versions[0].version):>34}  {'v' + str(versions[1].version):>34}")
    for key, a, b in rows:
        print(f"{key:<{width}}  {a:>34}  {b:>34}")
    print(f"the same: {', '.join(same)}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from workloads.inference import output_pairs, restore_files

    pairs = output_pairs(args.input, args.output, overwrite=args.overwrite)  # before the model is fetched
    from orchestrator.tracking import model_registry

    with quiet_mlflow("restore"):
        network, version = model_registry.load_network(args.model, args.tracking_uri)
    restore_files(network, pairs, tile=args.tile, overlap=args.overlap, self_ensemble=args.self_ensemble)
    print(f"restored {len(pairs)} image(s) with {version.name} v{version.version} -> {args.output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def tracking(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
        return parser

    reg = tracking(subparsers.add_parser("register", help="register a sweep's best trial (or a run) as a model version"))
    reg.add_argument("source", help="sweep name, sweep run id or trial run id")
    reg.add_argument("--name", required=True, help="registered model name, e.g. derain-glmha")
    reg.add_argument("--metric", default="psnr", help="metric that picks the best trial (default psnr)")
    reg.add_argument("--mode", choices=["max", "min"], default="max")
    reg.add_argument("--verbose", action="store_true", help=QUIET_MLFLOW_HELP)
    reg.set_defaults(handler=_register)

    group = subparsers.add_parser("registry", help="registered models: import, promote, list, show, compare")
    commands = group.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")
    imported = tracking(commands.add_parser("import", help="register the authors' released checkpoint as a model version"))
    imported.add_argument("arch", help="restormer, hint or mst_plus_plus (models/official_weights.py)")
    imported.add_argument("file", type=Path, help="the released checkpoint, e.g. deraining.pth")
    imported.add_argument("--name", required=True, help="registered model name, e.g. restormer-derain-official")
    imported.add_argument("--task", choices=list(TASKS), help="the task the checkpoint restores (recorded; evaluate uses it)")
    imported.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="a restorch model option the release was trained with, e.g. layernorm_type=BiasFree")
    imported.add_argument("--verbose", action="store_true", help=QUIET_MLFLOW_HELP)
    imported.set_defaults(handler=_import)
    promote = tracking(commands.add_parser("promote", help="point an alias (e.g. champion) at a version"))
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.set_defaults(handler=_promote)
    tracking(commands.add_parser("list", help="every registered version")).set_defaults(handler=_list)
    show = tracking(commands.add_parser("show", help="tags and model card of NAME[@alias|/version]"))
    show.add_argument("reference")
    show.set_defaults(handler=_show)
    compare = tracking(commands.add_parser("compare", help="the tags, model options and metrics two versions differ in"))
    compare.add_argument("name")
    compare.add_argument("v1")
    compare.add_argument("v2")
    compare.set_defaults(handler=_compare)

    restore = tracking(subparsers.add_parser("restore", help="restore images with a registered model"))
    restore.add_argument("--model", required=True, help="models:/NAME@alias or models:/NAME/VERSION")
    restore.add_argument("--input", required=True, type=Path, help="an image or a folder of images")
    restore.add_argument("--output", required=True, type=Path, help="an image path, or a folder for a folder input")
    restore.add_argument("--tile", type=int, help="tile size for large images (a multiple of 8)")
    restore.add_argument("--overlap", type=int, default=32)
    restore.add_argument("--self-ensemble", action="store_true", help="average the x8 flips/rotations")
    restore.add_argument("--overwrite", action="store_true", help="replace existing output files (or the input itself)")
    restore.add_argument("--verbose", action="store_true", help=QUIET_MLFLOW_HELP)
    restore.set_defaults(handler=_restore)
