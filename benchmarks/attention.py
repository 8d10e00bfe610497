"""Each channel attention inside a full Restormer: params, MACs, forward and forward+backward time.

    .venv/bin/python benchmarks/attention.py --size 128 --repeats 5

Times are medians over `--repeats` runs after `--warmup` runs, measured interleaved (every model
once per round) so that machine noise spreads evenly; ratios are to CSA-Restormer in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from models import build_model
from models.attention import ATTENTIONS
from models.profile import profile_model


def configs() -> dict[str, dict]:
    return {name: {"name": "restormer", "attention": name} for name in ATTENTIONS}


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    image = torch.rand(1, 3, args.size, args.size)
    models = {label: build_model(config) for label, config in configs().items()}
    profiles = {label: profile_model(model, size=args.size) for label, model in models.items()}

    def forward(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(image)

    def forward_backward(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(image).abs().mean().backward()

    times: dict[str, dict[str, list[float]]] = {label: {"fwd": [], "fwd+bwd": []} for label in models}
    for round_index in range(args.warmup + args.repeats):
        for label, model in models.items():
            fwd, fwd_bwd = timed(lambda: forward(model)), timed(lambda: forward_backward(model))
            if round_index >= args.warmup:
                times[label]["fwd"].append(fwd)
                times[label]["fwd+bwd"].append(fwd_bwd)

    median = {label: {kind: statistics.median(values) for kind, values in t.items()} for label, t in times.items()}
    base = median["csa"]
    print(f"Restormer at 1x3x{args.size}x{args.size}, CPU ({torch.get_num_threads()} threads), "
          f"median of {args.repeats} after {args.warmup} warm-up")
    header = f"{'attention':<10} {'params M':>9} {'conv GMACs':>11} {'total GMACs':>12} {'fwd s':>7} {'fwd/CSA':>8} {'fwd+bwd s':>10} {'f+b/CSA':>8}"
    print(header)
    print("-" * len(header))
    for label, profile in profiles.items():
        m = median[label]
        print(f"{label:<10} {profile.params / 1e6:>9.3f} {profile.conv_gmacs:>11.2f} {profile.total_gmacs:>12.2f} "
              f"{m['fwd']:>7.3f} {m['fwd'] / base['fwd']:>8.2f} {m['fwd+bwd']:>10.3f} {m['fwd+bwd'] / base['fwd+bwd']:>8.2f}")


if __name__ == "__main__":
    main()
