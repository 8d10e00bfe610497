"""Sweep results as rows: one per trial (its searched values, last validation metrics, model size,
wall time, how it ended and, for a failed trial, its exception in one line), sorted by the search
metric; printed as a table, written as CSV; the best trial and, for multi-objective searches, the
Pareto set.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from orchestrator.spec.schema import PROFILE_METRICS, ExperimentSpec

Row = dict[str, Any]

# where Ray Train and Tune keep the exception they wrap
CAUSE_ATTRIBUTES = ("worker_failures", "controller_failure", "cause")


def root_cause(error: BaseException) -> BaseException:
    """The exception under Ray's wrappers: a task error's cause, a training job's first failed worker's
    (or its controller's) exception."""
    while True:
        inner = next((getattr(error, name) for name in CAUSE_ATTRIBUTES if getattr(error, name, None)), None)
        if isinstance(inner, dict):  # worker_failures: rank -> exception
            inner = next(iter(inner.values()))
        if not isinstance(inner, BaseException):
            return error
        error = inner


def one_line(error: BaseException) -> str:
    """`Type: first line`, with the line after it when the first ends in ':' (a list of problems: the first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def result_columns(spec: ExperimentSpec, task_metrics: list[str]) -> list[str]:
    """The results table: trial, how it ended, searched values (pbt: the last ones), last validation
    metrics, size, wall time, the error of a failed trial."""
    return ["trial", "status", *spec.searched_keys(), "iteration", "loss", *task_metrics,
            *PROFILE_METRICS[:2], "wall_s", "error"]


def trial_rows(grid: Any, spec: ExperimentSpec, task_metrics: list[str]) -> list[Row]:
    """One row per trial of a Tune ResultGrid, best first by `search.metric`."""
    rows = []
    for result in grid:
        metrics = {**(result.metrics or {}), **(result.config or {})}  # none if it never reported
        metrics["wall_s"] = metrics.get("time_total_s")
        row: Row = {column: metrics.get(column) for column in result_columns(spec, task_metrics)}
        row.update(trial=metrics.get("trial_id") or Path(result.path).name, status=_status(result, spec),
                   error=None if result.error is None else one_line(root_cause(result.error)))
        if metrics.get("diverged"):  # Tune saw the worst score (orchestrator/run/sweep.py); the run's value was nan
            row.update({name: None for name in spec.objectives() if name in row})
        rows.append(row)
    return sort_rows(rows, spec.search.metric, spec.search.mode)


def _status(result: Any, spec: ExperimentSpec) -> str:
    if result.error is not None:
        return "error"
    iteration = (result.metrics or {}).get("iteration", 0)
    if (result.metrics or {}).get("diverged"):
        return f"diverged at {iteration}"
    return "finished" if iteration >= spec.train.iterations else f"stopped at {iteration}"


def sort_rows(rows: list[Row], metric: str, mode: str) -> list[Row]:
    """Best first; rows without the metric (or with nan) last."""
    def has_score(row: Row) -> bool:
        return row.get(metric) is not None and not (isinstance(row[metric], float) and math.isnan(row[metric]))

    scored = [row for row in rows if has_score(row)]
    unscored = [row for row in rows if not has_score(row)]
    return sorted(scored, key=lambda row: row[metric], reverse=mode == "max") + unscored


def pareto_front(rows: list[Row], objectives: dict[str, str]) -> list[Row]:
    """The rows no other row beats on every objective (and strictly on one)."""
    def better_or_equal(a: Row, b: Row, name: str) -> bool:
        return a[name] >= b[name] if objectives[name] == "max" else a[name] <= b[name]

    def dominates(a: Row, b: Row) -> bool:
        return all(better_or_equal(a, b, n) for n in objectives) and any(not better_or_equal(b, a, n) for n in objectives)

    complete = [row for row in rows if all(row.get(name) is not None for name in objectives)]
    return [row for row in complete if not any(dominates(other, row) for other in complete)]


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[Row], columns: list[str]) -> str:
    """A plain aligned text table of `columns` (keys of the rows)."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def to_csv(rows: list[Row], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
