"""Orchestration overhead: a sweep of N fixed-work trials (Ray Tune over Ray Train + DeepSpeed jobs)
vs the same trainings run one after another in one process, and the time from `restorch sweep` to
the first trial's first iteration.

    .venv/bin/python benchmarks/sweep_overhead.py --trials 8 --iterations 300   # = restorch bench sweep ...
"""
import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sweep", *sys.argv[1:]]))
