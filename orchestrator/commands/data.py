"""`restorch data synth` (write a small synthetic dataset), `restorch data check` (validate one, or
check it against a standard test set with --benchmark) and `restorch data benchmarks` (the catalogue)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from workloads.tasks import TASKS, get_task


def _synth(args: argparse.Namespace) -> int:
    from workloads.synth import write_dataset

    task = get_task(args.task, sigma=args.sigma)
    counts = write_dataset(args.out, task, count=args.count, size=args.size, seed=args.seed, val_fraction=args.val_fraction)
    print(f"wrote {counts['train']} train + {counts['val']} val {task.name} pairs of {args.size}x{args.size} to {args.out} "
          "(Restormer layout: train|val/input, train|val/target)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from workloads.data import check_dataset

    if args.benchmark is not None:
        return _check_benchmark(args)
    if args.task is None:
        raise ValueError("data check needs --task TASK (or --benchmark NAME, whose entry names the task)")
    task = get_task(args.task, sigma=args.sigma)
    scans = check_dataset(args.path, task, patch_size=args.patch_size)
    for scan in scans:
        source = scan.source
        folders = ", ".join(str(d) for d in (source.input_dir, source.target_dir) if d is not None)
        print(f"{source.split or '.'}: {source.layout.name} layout ({folders})")
        if scan.pairs:
            heights = [pair.height for pair in scan.pairs]
            widths = [pair.width for pair in scan.pairs]
            print(f"  {len(scan.pairs)} pairs, sizes {min(heights)}..{max(heights)} x {min(widths)}..{max(widths)} (HxW)")
        for problem in scan.problems:
            print(f"  problem: {problem}")
    total = sum(len(scan.problems) for scan in scans)
    print(f"{total} problem(s)" if total else f"ok for {task.name}")
    return 1 if total else 0


def _check_benchmark(args: argparse.Namespace) -> int:
    from workloads.benchmarks import check_benchmark

    check = check_benchmark(args.path, args.benchmark)
    benchmark = check.benchmark
    if args.task is not None and args.task != benchmark.task:
        raise ValueError(f"--task {args.task} does not match {benchmark.name}, a {benchmark.task} benchmark: drop --task")
    record = check.record(args.sigma)  # validates --sigma against the task
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted(check.sizes)[:5]) + (" ..." if len(check.sizes) > 5 else "")
    print(f"{benchmark.name} ({benchmark.task}): {check.count} of {benchmark.count} image(s) in {check.root}"
          + (f", sizes {sizes} (HxW)" if sizes else ""))
    for warning in check.warnings:
        print(f"  warning: {warning}")
    for problem in check.problems:
        print(f"  problem: {problem}")
    if check.problems:
        print(f"{len(check.problems)} problem(s): {check.root} does not match {benchmark.name} "
              f"(`restorch data benchmarks {benchmark.name}` shows the entry)")
        return 2
    print(f"protocol: {record['protocol']['description']} (version {record['protocol']['version']})")
    if benchmark.metric_notes:
        print(f"published numbers: {benchmark.metric_notes}")
    print(f"content digest: {check.digest}")
    if args.json:
        print(json.dumps(record))
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    from workloads.benchmarks import BENCHMARKS, get_benchmark

    entries = [get_benchmark(name) for name in args.names] if args.names else list(BENCHMARKS.values())
    print("\n\n".join(entry.describe() for entry in entries))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="synthesise and check restoration datasets")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    synth = commands.add_parser("synth", help="write a small paired dataset from scikit-image's photographs")
    synth.add_argument("--task", required=True, choices=list(TASKS))
    synth.add_argument("--out", required=True, type=Path, help="output folder (must be empty or absent)")
    synth.add_argument("--count", type=int, default=40, help="number of pairs (default 40)")
    synth.add_argument("--size", type=int, default=128, help="image height and width (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--val-fraction", type=float, default=0.2, help="share of pairs in val/ (default 0.2)")
    synth.add_argument("--sigma", type=float, help="noise level for gaussian_denoising, 0..255 scale (default 25)")
    synth.set_defaults(handler=_synth)

    check = commands.add_parser("check", help="validate a dataset folder: counts, sizes, problems")
    check.add_argument("path", type=Path, help="dataset folder (or a folder of splits, e.g. train/ and val/)")
    check.add_argument("--task", choices=list(TASKS), help="the task the data is for (with --benchmark: its entry's)")
    check.add_argument("--benchmark", metavar="NAME", help="check the folder against a standard test set "
                       "(count, pairing, sizes) and print its content digest; `restorch data benchmarks` lists them")
    check.add_argument("--patch-size", type=int, help="training patch size to check images against")
    check.add_argument("--sigma", type=float, help="noise level for gaussian_denoising")
    check.add_argument("--json", action="store_true", help="with --benchmark: also print the record a result keeps "
                       "(benchmark, protocol and version, digest) as JSON")
    check.set_defaults(handler=_check)

    benchmarks = commands.add_parser("benchmarks", help="the standard test sets: layout, count, protocol, sources")
    benchmarks.add_argument("names", nargs="*", metavar="NAME", help="entries to show (default: all)")
    benchmarks.set_defaults(handler=_benchmarks)
