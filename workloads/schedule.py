"""Restormer's learning-rate schedule: optional linear warm-up, constant, then cosine to min_lr."""
from __future__ import annotations

import math

# Restormer trains 300k iterations: constant lr for the first 92k, cosine decay for the rest.
RESTORMER_CONSTANT_FRACTION = 92 / 300


def lr_factor(iteration: int, *, total: int, base_lr: float, min_lr: float, warmup: int = 0,
              constant: int | None = None) -> float:
    """Multiplier of the base lr at a 0-based iteration (for torch's LambdaLR)."""
    constant = round(total * RESTORMER_CONSTANT_FRACTION) if constant is None else constant
    if iteration < warmup:
        return (iteration + 1) / warmup
    if iteration < max(constant, warmup):
        return 1.0
    decay_start = max(constant, warmup)
    progress = min(1.0, (iteration - decay_start) / max(1, total - decay_start))
    floor = min_lr / base_lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
