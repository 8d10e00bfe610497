"""Where a sweep's start-up time goes: `restorch bench sweep` asks every process to mark its phases.

With $RESTORCH_TIMELINE naming a file, `mark(phase)` appends `unix_time pid phase` to it; every process
of a sweep on the embedded Ray inherits the variable (the raylet starts with the driver's environment).
Unset, `mark` does nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

TIMELINE_ENV = "RESTORCH_TIMELINE"
# In the order a sweep reaches them: the driver, then each trial's Tune actor, then rank 0 of its job.
PHASES = ("driver_validated", "driver_ray_ready", "driver_tuner_started", "trial_started", "trial_job_submitted",
          "worker_started", "worker_imported")


def mark(phase: str) -> None:
    path = os.environ.get(TIMELINE_ENV)
    if path:
        with open(path, "a") as timeline:  # one short line per write: appends from several processes stay whole
            timeline.write(f"{time.time():.3f} {os.getpid()} {phase}\n")


def first_reached(path: Path) -> dict[str, float]:
    """The time at which the first process reached each phase."""
    first: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        stamp, _, phase = line.split()
        first[phase] = min(first.get(phase, float("inf")), float(stamp))
    return first
