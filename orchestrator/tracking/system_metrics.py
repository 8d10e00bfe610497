"""System metrics of training runs: MLflow 3's system-metrics monitor, and what the reports make of it.

Rank 0 of every tracked job (a sweep trial, `restorch train`: orchestrator/run/trial_job.py) runs `SystemMetrics`
for the job's run: a thread that samples the machine every SAMPLING_INTERVAL_S seconds (MLflow's variable
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it) and logs under `system/`: CPU utilisation and memory
(psutil), disk and network, and per GPU its utilisation and memory (nvidia-ml-py, where a GPU is present). They
are the machine's numbers (everything running on rank 0's node), not the process's. When it stops, it samples
once more (after MIN_WINDOW_S or more) and logs what it has not logged yet, so a run shorter than the interval
still has its numbers.

`run_costs` reads a run's back for the sweep report's cost columns (COST_COLUMNS).
"""
from __future__ import annotations

import math
import time
from typing import Any

import psutil
from mlflow.entities import Run
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from orchestrator.tracking.keys import (SYSTEM_CPU_PERCENT, SYSTEM_GPU_MEMORY_MB, SYSTEM_GPU_PERCENT, SYSTEM_GPU_PREFIX,
                                        SYSTEM_MEMORY_MB)

SAMPLING_INTERVAL_S = 5.0
MIN_WINDOW_S = 0.2  # the shortest window of a last sample: psutil reads 0.0 over one under its clock tick (10 ms)
COST_COLUMNS = ("cpu_pct", "memory_peak_mb", "gpu_pct", "gpu_memory_peak_mb")


class _Monitor(SystemMetricsMonitor):
    """MLflow's monitor, right for short runs too: psutil's first CPU reading of a process (0.0: it measures from
    the call before, and there is none) only starts the first sample's window, and at the end the time since the
    last sample is sampled and logged with what was not logged yet (MLflow's own monitor drops both)."""

    last_sample = None  # time.monotonic() of the last CPU reading

    def collect_metrics(self) -> dict[str, Any]:
        first, self.last_sample = self.last_sample is None, time.monotonic()
        if first:
            psutil.cpu_percent()
            return {}
        return super().collect_metrics()

    def finish(self) -> None:
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join()
        if self.last_sample is not None and time.monotonic() - self.last_sample >= MIN_WINDOW_S:
            self.collect_metrics()
        self.publish_metrics(self.aggregate_metrics())
        super().finish()


class SystemMetrics:
    """MLflow's system-metrics monitor on a run; `follow` moves it to the run that replaced it (a job's attempt
    that resumed from a checkpoint goes on in a new run: tracking/runs.restart_history)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.monitor = uri, None
        self.follow(run_id)

    def follow(self, run_id: str) -> None:
        if self.monitor is not None and self.monitor._run_id == run_id:
            return
        self.stop()
        self.monitor = _Monitor(run_id, sampling_interval=SAMPLING_INTERVAL_S, resume_logging=True,
                                tracking_uri=self.uri)
        self.monitor.start()

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def run_costs(client: MlflowClient, run: Run) -> dict[str, float | None]:
    """A run's COST_COLUMNS from its system metrics: the mean CPU utilisation (%), the peak memory in use (MB),
    the mean utilisation of its GPUs (%) and the peak memory in use on one of them (MB); None where not logged."""
    def history(key: str) -> list[float]:
        return [metric.value for metric in client.get_metric_history(run.info.run_id, key)
                if math.isfinite(metric.value)]

    def gpu(suffix: str) -> list[float]:
        keys = [key for key in run.data.metrics if key.startswith(SYSTEM_GPU_PREFIX) and key.endswith(suffix)]
        return [value for key in sorted(keys) for value in history(key)]

    cpu, memory = history(SYSTEM_CPU_PERCENT), history(SYSTEM_MEMORY_MB)
    gpu_use, gpu_memory = gpu(SYSTEM_GPU_PERCENT), gpu(SYSTEM_GPU_MEMORY_MB)
    values: list[Any] = [_mean(cpu), max(memory, default=None), _mean(gpu_use), max(gpu_memory, default=None)]
    return dict(zip(COST_COLUMNS, values))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
