"""A sweep's progress on the console (orchestrator/console.py), from a Tune callback in the driver:
a line when a trial starts, one line per trial report (iteration, loss, the task's metrics, images/s,
the trial's ETA), a line when a trial ends (finished, stopped early by the scheduler, or failed: its
one-line cause and where the traceback is), and then the table of the sweep's trials. (A trial stops
early by the scheduler's decision, e.g. ASHA's, or at the sweep's time budget.)

The trial-end lines come from Tune's own hooks (`Callback.on_trial_complete` / `on_trial_error`). The
table is not Tune's reporter (`RunConfig(progress_reporter=CLIReporter(...))`, Ray 2.60), because:
- Tune uses a reporter only in its legacy output (`RAY_AIR_NEW_OUTPUT=0` and `verbose >= 1`); under the
  default output it drops a given reporter with a warning (ray/tune/tune.py).
- A reporter is called from Tune's loop with the list of trials, at most every `max_report_frequency`
  seconds: it never sees a single result, so it cannot print one line per report (with the ETA since
  the previous one) nor a line when a trial starts or ends; those need these Callback hooks anyway.
- CLIReporter's table (tabulate's psql, Tune's columns, `== Status ==` with the scheduler's and the
  resources' lines, printed to standard output, which in quiet mode is the sweep's log) is not the one
  restorch prints (`format_table`, like the results table, via `console.print`): a subclass overriding
  its report and printing would keep nothing of it but the call every few seconds.
A failed trial's cause is read from the pickle Tune writes into the trial's driver-side folder before
the callbacks run, not with `Trial.get_pickled_error()`, which reads the copy in the sweep's storage,
uploaded later (on S3 possibly after this callback)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray import cloudpickle
from ray.tune import Callback

from orchestrator.console import console
from orchestrator.report.results import format_table, format_value, one_line, root_cause


def trial_error(trial: Any) -> str:
    """A failed trial's cause in one line, from the exception Tune pickled for it (written before the
    callbacks run; its text copy is cut in the middle for long messages), else that text's last line."""
    path = trial.pickled_error_file
    if path and Path(path).exists():
        try:
            with open(path, "rb") as file:
                return one_line(root_cause(cloudpickle.load(file)))
        except Exception:  # an exception class the driver cannot import: fall back to the text
            pass
    text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


class SweepProgress(Callback):
    """`trials`: how many the sweep runs (the search space's count; Tune creates them as it goes).
    The table follows a trial's end at most every `table_interval_s`, and not after the last one
    (the results table follows)."""

    def __init__(self, searched: list[str], metrics: list[str], *, trials: int, iterations: int,
                 table_interval_s: float = 30.0) -> None:
        self.searched, self.metrics = searched, metrics
        self.trials, self.iterations = trials, iterations
        self.table_interval_s = table_interval_s
        self.columns = ["trial", "status", *searched, "iteration", "loss", *metrics, "images_per_s"]
        self._last_report: dict[str, tuple[float, int]] = {}  # trial id -> (time_total_s, iteration)
        self._last_table = -math.inf

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = " ".join(f"{key}={'-' if trial.config.get(key) is None else trial.config[key]}"  # -: inactive
                          for key in self.searched)
        console.print(f"trial {trial.trial_id} started: {values}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        console.print(self.progress_line(trial.trial_id, result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        done = last.get("iteration", 0)
        scores = self._scores(last)
        if done >= self.iterations:
            console.print(f"trial {trial.trial_id} finished: {scores}")
        else:
            console.print(f"trial {trial.trial_id} stopped early at iteration {done}/{self.iterations}: {scores}")
        self._table(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cause = trial_error(trial)
        where = f"; traceback in {console.log}" if console.log else ""
        console.print(f"trial {trial.trial_id} failed: {cause}{where}")
        self._table(trials, trial, "ERROR")

    def progress_line(self, trial_id: str, result: dict) -> str:
        step, elapsed = result.get("iteration", 0), result.get("time_total_s", 0.0)
        line = f"trial {trial_id} iter {step}/{self.iterations}"
        if result.get("loss") is not None:
            line += f" loss {result['loss']:.4f}"
        scores = self._scores(result)
        line += f" {scores}" if scores else ""
        if result.get("images_per_s") is not None:
            line += f" {result['images_per_s']:.1f} img/s"
        previous = self._last_report.get(trial_id)
        self._last_report[trial_id] = (elapsed, step)
        if previous is not None and step > previous[1]:  # the rate since the previous report: start-up excluded
            eta = (self.iterations - step) * (elapsed - previous[0]) / (step - previous[1])
            line += f" eta {eta:.0f}s"
        return line

    def _scores(self, result: dict) -> str:
        return " ".join(f"{name} {format_value(result[name])}" for name in self.metrics if result.get(name) is not None)

    def _table(self, trials: list, ending: Any, status: str) -> None:
        """The trials' table as `ending` ends with `status` (Tune sets it after the callbacks)."""
        statuses = {trial.trial_id: status if trial is ending else trial.status for trial in trials}
        ended = sum(value in ("TERMINATED", "ERROR") for value in statuses.values())
        running = sum(value == "RUNNING" for value in statuses.values())
        total = max(self.trials, len(trials))
        if ended == total or time.monotonic() - self._last_table < self.table_interval_s:
            return
        self._last_table = time.monotonic()
        rows = []
        for trial in trials:
            last = trial.last_result or {}
            row = {"trial": trial.trial_id, "status": statuses[trial.trial_id],
                   **{key: trial.config.get(key) for key in self.searched}}
            row.update({column: last.get(column) for column in self.columns[2 + len(self.searched):]})
            rows.append(row)
        console.print(f"\n== sweep progress: {ended}/{total} trials ended, {running} running, "
                      f"{total - ended - running} to run ==\n{format_table(rows, self.columns)}\n")
