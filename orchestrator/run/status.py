"""`restorch status`: the sweeps in a storage folder and their trials' states, read from Tune's
experiment state in storage and from the sweep's MLflow runs (nothing is started or created)."""
from __future__ import annotations

from typing import Any

import pyarrow.fs

from orchestrator.report.results import Row
from orchestrator.spec.schema import ExperimentSpec
from workloads.storage import filesystem
from orchestrator.run.sweep import read_stored_spec
from orchestrator.tracking.runs import trial_statuses


def _trials(folder: str, endpoint_url: str | None) -> list[Any]:
    from ray.tune import ExperimentAnalysis

    fs, path = filesystem(folder, endpoint_url)
    try:
        return ExperimentAnalysis(path, storage_filesystem=fs).trials
    except (ValueError, FileNotFoundError):  # the sweep was stopped before Tune saved any state
        return []


def list_sweeps(storage: str, endpoint_url: str | None = None) -> list[Row]:
    """One row per sweep in `storage` (`endpoint_url`: its S3-compatible store): name, trials per Tune state."""
    fs, root = filesystem(storage, endpoint_url)
    folders = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
               if info.type == pyarrow.fs.FileType.Directory]
    rows = []
    for name in sorted(folders):
        folder = f"{storage}/{name}"
        if read_stored_spec(folder, endpoint_url) is None:
            continue  # a `restorch train` job, not a sweep
        states = [trial.status for trial in _trials(folder, endpoint_url)]
        rows.append({"sweep": name, "trials": len(states),
                     **{state.lower(): states.count(state) for state in ("PENDING", "RUNNING", "TERMINATED", "ERROR")}})
    return rows


def sweep_trials(folder: str, endpoint_url: str | None = None, *,
                 tracking_uri: str | None = None) -> tuple[ExperimentSpec, list[Row]]:
    """The spec of the sweep stored in `folder` (`endpoint_url`: its S3-compatible store) and one row per
    trial: Tune state, searched values, last iteration and metric, MLflow run status (from `tracking_uri`
    if given, as `restorch serve` does: not from a store the folder's spec names)."""
    spec = read_stored_spec(folder, endpoint_url)
    if spec is None:
        raise FileNotFoundError(f"no sweep in {folder} (it holds no spec.yaml); `restorch status` lists the sweeps")
    if tracking_uri is not None:
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": tracking_uri})})
    mlflow_status = trial_statuses(spec, folder)
    rows = []
    for trial in _trials(folder, endpoint_url):
        last = trial.last_result or {}
        searched = {key: trial.config.get(key) for key in spec.searched_keys()}
        rows.append({"trial": trial.trial_id, "tune": trial.status, **searched,
                     "iteration": last.get("iteration"), spec.search.metric: last.get(spec.search.metric),
                     "mlflow": mlflow_status.get(trial.trial_id, "-")})
    return spec, rows
