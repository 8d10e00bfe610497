"""The report of an ablation or sweep as data: its rows and columns, metric columns, curves and the
machines its timings come from; `better` says which way a metric improves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from orchestrator.report.results import Row
from orchestrator.spec.schema import ExperimentSpec

LOWER_IS_BETTER = ("mrae", "rmse", "loss")


Curve = list[tuple[int, float]]  # (iteration, value)


class MetricColumn(NamedTuple):
    key: str  # the MLflow metric and CSV column: psnr, or psnr/Rain100L
    metric: str  # the task's metric (psnr)
    val_set: str | None  # its validation set; None: the only set, or the mean over the named sets


@dataclass
class Report:
    spec: ExperimentSpec
    parent_run_id: str
    metrics: list[str]  # the task's validation metrics
    metric_columns: list[MetricColumn]  # per named set (two or more sets), then the metrics (their mean)
    rows: list[Row]  # one per variant, baseline first
    columns: list[str]  # the CSV columns
    curves: dict[str, list[dict[str, Curve]]]  # variant label -> per finished run: metric -> its history
    machines: list[str] = field(default_factory=list)  # where the timings were measured, every row's
    warnings: list[str] = field(default_factory=list)  # arms that are not comparable (iterations, data)
    record: list[str] = field(default_factory=list)  # the reproducibility record (orchestrator/tracking/record.py)
    protocol: list[str] = field(default_factory=list)  # the metric protocols of its runs (record.protocol_lines)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trained(self) -> bool:
        return not self.spec.ablation.profile_only

    @property
    def val_sets(self) -> list[str]:
        """The validation sets with columns of their own (two or more named sets), else none."""
        return list(dict.fromkeys(column.val_set for column in self.metric_columns if column.val_set))

    @property
    def hours_key(self) -> str:
        return "gpu_hours" if self.spec.resources.use_gpu else "cpu_hours"

    @property
    def primary_metric(self) -> str:
        """The metric the plots show: the search metric if the task reports it, else the task's first."""
        return self.spec.search.metric if self.spec.search.metric in self.metrics else self.metrics[0]


def better(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"
