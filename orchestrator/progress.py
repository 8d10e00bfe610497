"""Live progress of a sweep in the terminal: a table of its trials (status, searched values,
iteration, loss, the task's metrics, images/s), printed by a Tune callback when trials report,
at most every `interval_s` seconds, and whenever a trial ends."""
from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from orchestrator.results import format_table


class ProgressTable(Callback):
    def __init__(self, searched: list[str], metrics: list[str], interval_s: float = 20.0) -> None:
        self.searched = searched
        self.columns = ["trial", "status", *searched, "iteration", "loss", *metrics, "images_per_s"]
        self.interval_s = interval_s
        self._last_print = 0.0

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if time.monotonic() - self._last_print >= self.interval_s:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials)

    def _print(self, trials: list) -> None:
        self._last_print = time.monotonic()
        rows = []
        for trial in trials:
            last = trial.last_result or {}
            row = {"trial": trial.trial_id, "status": trial.status, **{key: trial.config.get(key) for key in self.searched}}
            row.update({column: last.get(column) for column in self.columns[2 + len(self.searched):]})
            rows.append(row)
        done = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        print(f"\n== sweep progress: {done}/{len(trials)} trials ended ==\n{format_table(rows, self.columns)}\n", flush=True)
