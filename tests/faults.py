"""Worker faults for training jobs, through the job config's test hook (workloads/job_config.IterationHook).

`crash(rank, at_iteration, marker)` is the hook that makes worker `rank` raise before iteration
`at_iteration`, once: it leaves `marker` behind, so the restarted worker gets past that point. Hand it to
`run_job(..., test_hook=...)`, put it in a job config, or (sweep trials, a subprocess) set
$RESTORCH_TEST_HOOK to `crash_env(...)`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from workloads.job_config import IterationHook


def crash_once(*, step: int, rank: int, crash_rank: int, at_iteration: int, marker: str) -> None:
    if rank == crash_rank and step == at_iteration and not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError(f"injected fault in worker {rank} at iteration {step}")


def crash(rank: int, at_iteration: int, marker: Path | str) -> IterationHook:
    return IterationHook(str(Path(__file__).resolve()), crash_once.__name__,
                         {"crash_rank": rank, "at_iteration": at_iteration, "marker": str(marker)})


def crash_env(rank: int, at_iteration: int, marker: Path | str) -> str:
    """The hook as $RESTORCH_TEST_HOOK (orchestrator/run/jobs.TEST_HOOK_ENV) holds it."""
    return json.dumps(dataclasses.asdict(crash(rank, at_iteration, marker)))
