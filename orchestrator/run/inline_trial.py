"""An inline trial: a one-worker sweep trial trains in its Tune trial's own process, not in a Ray Train job.

A Train job costs a controller, a worker group and their Python processes (each importing torch, Ray and
MLflow again): about 20 s of wall time per trial on 2 cores, more than a short trial's training. A trial of
one worker needs none of it. The same as a job trial: the recipe (orchestrator/run/trial_job.py's tracked
loop around workloads/train.py), the MLflow child run and its console lines, the checkpoints in
`{sweep}/jobs/{trial id}/checkpoint_*` and the resume from the newest intact one, the validation reports
Tune gets (recorded first: orchestrator/run/trial_reports.py). What differs: a failed trial is retried by
Tune (the sweep's FailureConfig), the trial reserves the worker's CPUs/GPU itself, and which checkpoints
are kept is decided here, as Ray Train decides it (the latest, and the best by the sweep's metric).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

from orchestrator.run.timeline import mark
from workloads.job_config import JobConfig
from workloads.session import TrialStopped, newest_intact, stored_checkpoints
from workloads.storage import filesystem

REPORT_FILE = "report.json"  # in a stored checkpoint, written last: the metrics reported with it, to rank it by
# In the job's folder when a Ray Train job of the trial stored checkpoints (a sweep that ran its trials as jobs
# before): Ray's record of the checkpoints it stored whole, with their metrics.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class InlineSession:
    """The one rank of an inline trial: checkpoints go to the job's folder in storage, validation reports to
    Tune (`for_tune` turns a report into what Tune gets, or None; no `for_tune`: nothing goes to Tune)."""

    rank, world_size = 0, 1

    def __init__(self, config: JobConfig, *, keep: int | None, metric: str, mode: str,
                 for_tune: Callable[[dict[str, Any]], dict[str, Any] | None] | None) -> None:
        self.fs, self.folder = filesystem(config.storage.folder, config.storage.endpoint_url)
        self.keep, self.metric, self.mode, self.for_tune = keep, metric, mode, for_tune
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None
        self._stored: dict[str, dict[str, Any]] | None = None  # `_reports()`, read once, then kept up to date

    def resume_directory(self) -> Any:
        """A local copy of the newest intact checkpoint of the job, or None. A checkpoint without a report was
        cut short (the trial's process died while storing it)."""
        candidates, reports = [], self._stored_reports()
        for path, fetch in stored_checkpoints(self.fs, self.folder):
            if path in reports:
                candidates.append((path, fetch))
            else:
                print(f"[restorch] checkpoint {path} is incomplete (its trial stopped while storing it); skipped", flush=True)
        return newest_intact(candidates, self.rank) if candidates else None

    def _stored_reports(self) -> dict[str, dict[str, Any]]:
        if self._stored is None:
            self._stored = self._reports()
        return self._stored

    def _reports(self) -> dict[str, dict[str, Any]]:
        """The metrics stored with each whole checkpoint of the job (path -> metrics)."""
        reports = {}
        snapshot = self._read_json(f"{self.folder}/{RAY_SNAPSHOT}") or {}
        for result in snapshot.get("checkpoint_results", []):
            reports[f"{self.folder}/{result['checkpoint_dir_name']}"] = result.get("metrics", {})
        for path, _ in stored_checkpoints(self.fs, self.folder):
            report = self._read_json(f"{path}/{REPORT_FILE}")
            if report is not None:
                reports[path] = report
        return reports

    def _read_json(self, path: str) -> Any:
        try:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except (OSError, ValueError):  # none, or unreadable: the checkpoint counts as cut short
            return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        self.last_metrics = metrics
        if checkpoint_dir is not None:
            self._store(Path(checkpoint_dir), checkpoint_name, metrics)
        scored = self.for_tune(metrics) if self.for_tune else None
        if scored is None:
            return
        try:
            tune.report(scored)
        except SystemExit as stop:  # how Tune ends a trial's thread when its scheduler stops the trial
            raise TrialStopped(f"stopped by the scheduler at iteration {metrics['iteration']}") from stop

    def _store(self, local: Path, name: str, metrics: dict[str, Any]) -> None:
        path = f"{self.folder}/{name}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:  # a re-run iteration: replace it
            self.fs.delete_dir(path)
        self.fs.create_dir(path)
        pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs)
        reports = self._stored_reports()
        with self.fs.open_output_stream(f"{path}/{REPORT_FILE}") as stream:
            stream.write(json.dumps(metrics, default=float).encode())
        reports[path] = metrics
        self.last_checkpoint = path
        if self.keep is not None:
            self._prune(latest=path)

    def _prune(self, latest: str) -> None:
        """Keep the latest checkpoint and the keep - 1 best others by the metric (unscored ones rank last)."""
        reports = self._stored_reports()

        def rank(path: str) -> float:
            score = float(reports.get(path, {}).get(self.metric, math.nan))
            return math.inf if math.isnan(score) else -score if self.mode == "max" else score

        others = [path for path, _ in stored_checkpoints(self.fs, self.folder) if path != latest]
        for path in sorted(others, key=rank)[self.keep - 1:]:
            self.fs.delete_dir(path)
            reports.pop(path, None)


def run_inline(config: JobConfig, *, use_gpu: bool, keep: int | None, metric: str, mode: str,
               for_tune: Callable[[dict[str, Any]], dict[str, Any] | None] | None) -> tuple[dict[str, Any], str | None]:
    """Train the trial's job here (from its newest intact checkpoint, if any); returns its last report and
    the path of its last stored checkpoint."""
    mark("worker_started")
    from orchestrator.run.trial_job import tracked_train_loop
    from workloads.train import init_local_process_group

    mark("worker_imported")
    init_local_process_group(use_gpu=use_gpu)
    session = InlineSession(config, keep=keep, metric=metric, mode=mode, for_tune=for_tune)
    last_validation = tracked_train_loop(config, session)
    # nothing reported: resumed from its final checkpoint (the trial's process died before Tune had its end)
    return session.last_metrics or last_validation, session.last_checkpoint
