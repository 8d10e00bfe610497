"""`restorch data synth` (write a small synthetic dataset) and `restorch data check` (validate one)."""
from __future__ import annotations

import argparse
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
    check.add_argument("--task", required=True, choices=list(TASKS))
    check.add_argument("--patch-size", type=int, help="training patch size to check images against")
    check.add_argument("--sigma", type=float, help="noise level for gaussian_denoising")
    check.set_defaults(handler=_check)
