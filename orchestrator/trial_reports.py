"""What a sweep trial's job reports to Tune: its validation reports, scored so that Tune can rank them.

Kept apart from orchestrator/sweep.py because the callback travels to each job's Ray Train controller
process, which imports the module it is defined in: this one needs only Ray Tune, not torch or MLflow
(that import cost about 6 s of CPU per trial on a 2-core machine).
"""
from __future__ import annotations

import math
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

DIVERGED_SCORE = {"max": -1e9, "min": 1e9}  # what Tune sees for a diverged (nan) trial: the worst score


def scored_for_tune(metrics: dict[str, Any], objectives: dict[str, str]) -> dict[str, Any]:
    """`metrics` with a non-finite objective (a diverged run: nan loss, nan psnr) replaced by the worst
    score and `diverged` set: ASHA and PBT never cut or copy by nan, which compares false both ways."""
    bad = [name for name in objectives if isinstance(metrics.get(name), float) and not math.isfinite(metrics[name])]
    if not bad:
        return metrics
    return {**metrics, **{name: DIVERGED_SCORE[objectives[name]] for name in bad}, "diverged": True}


class TrialReportCallback(TuneReportCallback):
    """Forwards the job's validation reports (those holding `validation_metric`, and the model's size
    metrics: orchestrator/trial_job.py) to Tune; the other reports (loss logging) go to MLflow only."""

    def __init__(self, validation_metric: str, objectives: dict[str, str]) -> None:
        super().__init__()
        self.validation_metric, self.objectives = validation_metric, objectives

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.validation_metric in metrics[0]:
            super().after_report(run_context, [scored_for_tune(metrics[0], self.objectives)], checkpoint)
