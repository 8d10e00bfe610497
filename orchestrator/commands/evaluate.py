"""`restorch evaluate`: metrics under the task's protocol, of saved results (`--pred DIR --target DIR`)
or of a registered model run on a dataset (`--model models:/NAME@alias --data DIR [--benchmark NAME]`, logged
to MLflow)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrator.commands import QUIET_MLFLOW_HELP
from orchestrator.console import quiet_mlflow
from workloads.outputs import check_output_file
from workloads.tasks import TASKS, Task, get_task


def _files_by_stem(folder: Path) -> dict[str, Path]:
    from workloads.files import DATA_SUFFIXES

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in DATA_SUFFIXES:
            continue
        if path.stem in files:
            raise ValueError(f"{path} and {files[path.stem]} share a name: keep one of them")
        files[path.stem] = path
    if not files:
        raise ValueError(f"{folder} holds no images or cubes ({', '.join(DATA_SUFFIXES)})")
    return files


def evaluate_folders(pred_dir: Path, target_dir: Path, task: Task) -> dict:
    """The task protocol's result record for files of the same name (any suffix) in both folders."""
    from workloads.files import read_array

    preds, targets = _files_by_stem(pred_dir), _files_by_stem(target_dir)
    unmatched = sorted(set(preds) ^ set(targets))
    if unmatched:
        listed = ", ".join(str(preds.get(stem) or targets[stem]) for stem in unmatched[:10])
        raise ValueError(
            f"{len(unmatched)} file(s) have no counterpart (names must match): {listed}; "
            "evaluate complete sets only, or remove the extra files"
        )
    per_image = {}
    for stem, target_path in targets.items():
        pred, target = read_array(preds[stem]), read_array(target_path)
        if pred.shape != target.shape:
            raise ValueError(f"{preds[stem]} is {pred.shape} but {target_path} is {target.shape}: results must keep the target's size")
        per_image[stem] = task.protocol.measure(pred, target)
    return {"task": task.name, **task.protocol.report(per_image)}


def format_result(result: dict) -> str:
    metrics = result["protocol"]["metrics"]
    width = max(len("image"), *(len(name) for name in result["images"]))
    lines = [f"{'image':<{width}} " + " ".join(f"{m:>9}" for m in metrics)]
    for name, values in result["images"].items():
        lines.append(f"{name:<{width}} " + " ".join(f"{values[m]:>9.4f}" for m in metrics))
    lines.append(f"{'mean':<{width}} " + " ".join(f"{result['mean'][m]:>9.4f}" for m in metrics))
    lines.append(f"{result['count']} images, task {result['task']}; protocol: {result['protocol']['description']}")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, option="--json", overwrite=args.overwrite)
    if args.model:
        if not args.data or args.pred or args.target:
            raise ValueError("--model takes --data DIR (a dataset folder), not --pred/--target")
        from orchestrator.tracking.model_registry import evaluate_version

        with quiet_mlflow("evaluate"):
            result, run_id = evaluate_version(args.model, args.data, args.task, benchmark=args.benchmark, sigma=args.sigma,
                                              uri=args.tracking_uri)
        print(format_result(result))
        if args.benchmark:
            print(f"benchmark {args.benchmark}, data digest {result['digest']}")
        print(f"logged to MLflow run {run_id} (linked to {result['model']})")
    elif args.benchmark:
        raise ValueError("--benchmark evaluates a registered model: give --model URI --data DIR")
    elif args.pred and args.target:
        if args.task is None:
            raise ValueError("--pred/--target need --task TASK (it fixes the metric protocol)")
        result = evaluate_folders(args.pred, args.target, get_task(args.task, sigma=args.sigma))
        print(format_result(result))
    else:
        raise ValueError("give --pred DIR --target DIR (saved results) or --model URI --data DIR (a registered model)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"result written to {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("evaluate", help="PSNR/SSIM (or spectral metrics) of results against targets")
    evaluate.add_argument("--pred", type=Path, help="folder of restored images (or cubes)")
    evaluate.add_argument("--target", type=Path, help="folder of ground truth, same file names")
    evaluate.add_argument("--model", help="a registered model, models:/NAME@alias or models:/NAME/VERSION")
    evaluate.add_argument("--data", type=Path, help="with --model: a dataset folder (input/ + target/ or another layout)")
    evaluate.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    evaluate.add_argument("--task", choices=list(TASKS),
                          help="fixes the protocol (e.g. Y channel for deraining); required unless --benchmark names it")
    evaluate.add_argument("--benchmark", help="with --model: a catalogued test set (`restorch data benchmarks`); --data is "
                          "checked against it first and the result carries its protocol and the data's digest")
    evaluate.add_argument("--sigma", type=float, help="gaussian_denoising noise level the results were made at (recorded)")
    evaluate.add_argument("--json", type=Path, help="also write the result record (with its protocol) to this file")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    evaluate.add_argument("--verbose", action="store_true", help=f"with --model: {QUIET_MLFLOW_HELP}")
    evaluate.set_defaults(handler=_evaluate)
