"""What a sweep trial's job reports to Tune: its validation reports, scored so that Tune can rank them,
each first recorded in storage (the record a resumed sweep rebuilds its scheduler from:
orchestrator/run/sweep_resume.py).

Kept apart from orchestrator/run/sweep.py because the callback travels to each job's Ray Train controller
process, which imports the module it is defined in: this one needs only Ray Tune and pyarrow, not torch or
MLflow (that import cost about 6 s of CPU per trial on a 2-core machine).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

DIVERGED_SCORE = {"max": -1e9, "min": 1e9}  # what Tune sees for a diverged (nan) trial: the worst score
REPORTS_DIR = "reports"  # {sweep}/reports/{trial id}/{iteration:07d}.json: {"time": ..., "metrics": {...}}


def scored_for_tune(metrics: dict[str, Any], objectives: dict[str, str]) -> dict[str, Any]:
    """`metrics` with a non-finite objective (a diverged run: nan loss, nan psnr) replaced by the worst
    score and `diverged` set: ASHA and PBT never cut or copy by nan, which compares false both ways."""
    bad = [name for name in objectives if isinstance(metrics.get(name), float) and not math.isfinite(metrics[name])]
    if not bad:
        return metrics
    return {**metrics, **{name: DIVERGED_SCORE[objectives[name]] for name in bad}, "diverged": True}


def record_report(fs: pyarrow.fs.FileSystem, sweep_path: str, trial_id: str, metrics: dict[str, Any]) -> None:
    """Store one report of a trial (what Tune is about to get, once this returns) with the time it came. A
    report of an iteration already stored (a job re-running iterations after its last checkpoint) keeps the first."""
    folder = f"{sweep_path}/{REPORTS_DIR}/{trial_id}"
    path = f"{folder}/{int(metrics['iteration']):07d}.json"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        return
    fs.create_dir(folder)
    partial = f"{path}.partial"  # moved into place once whole: a failed write (a full disk) leaves no record
    with fs.open_output_stream(partial) as stream:
        stream.write(json.dumps({"time": time.time(), "metrics": metrics}, default=float).encode())
    fs.move(partial, path)


class TrialReportCallback(TuneReportCallback):
    """Forwards the job's validation reports (those holding `validation_metric`, and the model's size
    metrics: orchestrator/run/trial_job.py) to Tune, each recorded first in the sweep's folder (`sweep`: its
    filesystem and path there); the other reports (loss logging) go to MLflow only.

    The last validation (at `last_iteration`) is withheld until the job has ended: the trial hands it to Tune
    itself (`report_last`). A scheduler stops a trial on its report at max_t (ASHA, HyperBand), and a stop
    ends the trial's process at once: given while the job still ran, it would cut off the run's closing
    (its FINISHED status and what its metrics are of), and the trial would count as stopped early."""

    def __init__(self, validation_metric: str, objectives: dict[str, str], *, trial_id: str,
                 sweep: tuple[pyarrow.fs.FileSystem, str], last_iteration: int) -> None:
        super().__init__()
        self.validation_metric, self.objectives = validation_metric, objectives
        self.trial_id, self.sweep, self.last_iteration = trial_id, sweep, last_iteration

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        scored = self.for_tune(metrics[0])
        if scored is not None:
            super().after_report(run_context, [scored], checkpoint)

    def for_tune(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """What Tune gets of a report while the job runs (recorded in the sweep's folder first), or None: not a
        validation report, or the last one."""
        if self.validation_metric not in metrics or metrics["iteration"] >= self.last_iteration:
            return None
        return self._recorded(metrics)

    def report_last(self, metrics: dict[str, Any] | None) -> None:
        """Hand Tune the job's last report (`metrics`), once the job has ended."""
        if self.validation_metric not in (metrics or {}):
            return
        try:
            tune.report(self._recorded(metrics))
        except SystemExit:  # how Tune ends a trial's thread when the scheduler stops it: nothing was left to do
            pass

    def _recorded(self, metrics: dict[str, Any]) -> dict[str, Any]:
        scored = scored_for_tune(metrics, self.objectives)
        record_report(*self.sweep, self.trial_id, scored)
        return scored
