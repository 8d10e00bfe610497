"""A sweep's two-way table as data: the ranking metric over two grid/choice factors, one factor's values as
rows, the other's as columns, each cell the mean over the finished trials that ran that pair (their seeds,
repeats) and, over two or more, the sample standard deviation. formats.two_way_cells formats and marks it.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from orchestrator.report.importance import scored
from orchestrator.report.results import Row
from orchestrator.spec.schema import Domain

DISCRETE = ("grid", "choice")  # the search-space kinds a two-way table is made of


@dataclass
class TwoWay:
    """The metric over two factors: `row_key`'s values as rows, `column_key`'s as columns; `cells` row by
    row, each {"row", "column", "runs" (finished trials), metric (mean or None), metric_std (None below two)}."""
    row_key: str
    column_key: str
    metric: str
    row_values: list[Any]
    column_values: list[Any]
    cells: list[Row]

    def cell(self, row_value: Any, column_value: Any) -> Row:
        return self.cells[self.row_values.index(row_value) * len(self.column_values)
                          + self.column_values.index(column_value)]


def two_way_table(first: Domain, second: Domain, rows: list[Row], metric: str) -> TwoWay:
    """`metric` over every pair of the two factors' values (first: rows, second: columns) from these
    trials' rows: the mean and, over two or more, the sample standard deviation."""
    cells = []
    for row_value in first.values:
        for column_value in second.values:
            values = [row[metric] for row in scored(rows, metric)
                      if row.get(first.key) == row_value and row.get(second.key) == column_value]
            cells.append({"row": row_value, "column": column_value, "runs": len(values),
                          metric: statistics.fmean(values) if values else None,
                          f"{metric}_std": statistics.stdev(values) if len(values) > 1 else None})
    return TwoWay(first.key, second.key, metric, list(first.values), list(second.values), cells)
