"""MLflow tracking of sweeps: one parent run per sweep, one nested child run per trial.

Who logs what:
- the sweep driver (orchestrator/sweep.py) opens the parent run (`open_sweep_run`: the spec as an
  artifact, the searched space, the search settings, git commit, versions, host), closes child runs
  that Tune ended without their job finishing (`TrialStatusCallback`: stopped early, failed) and
  finally the parent run itself (`close_sweep_run`, with the results table);
- the driver side of each trial (the Tune function trainable) finds or creates the trial's child run
  (`open_trial_run`), so that a trial re-run after a failure or a resume continues the same run;
- rank 0 of the trial's Ray Train job (`tracked_train_loop` in orchestrator/trial_job.py, the workers'
  entry point in sweeps)
  logs everything else into it: flattened params, the profiler numbers, each report's metrics, the
  latest checkpoint's location, the final consolidated model (`model/model.pt`) and the status;
- a pbt trial's driver side also logs each job it starts (`log_pbt_job`): its lr / weight decay as
  metrics at the start iteration and, when it continues another trial's checkpoint, a tag naming it.

The tracking URI is the spec's `tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded
`sqlite:///mlflow.db` with artifacts in `mlartifacts/`, both in the working directory. It is made
absolute and travels to the trials and workers in their config, so every process logs to the same
store (nothing falls back to a worker-local `mlruns/`).
"""
from __future__ import annotations

import getpass
import importlib.metadata
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from orchestrator.spec import ExperimentSpec

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "restorch.sweep"  # the sweep's storage location: identifies its parent run
TRIAL_TAG = "restorch.trial_id"
CHECKPOINT_TAG = "restorch.checkpoint"
STOPPED_TAG = "restorch.stopped_early"
EXPLOIT_TAG = "restorch.pbt.exploit"  # + ".{job}": that job of the trial continued another trial's checkpoint
VERSIONED_PACKAGES = ("restorch", "torch", "ray", "deepspeed", "mlflow", "optuna")
_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch


def sqlite_file(uri: str) -> Path | None:
    """The database file of an embedded SQLite store URI (sqlite:///path), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, absolute: relative SQLite files and plain folders are resolved here,
    in the driver's working directory, not in some worker's."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    database = sqlite_file(uri)
    if database is not None and not database.is_absolute():
        return f"sqlite:///{database.resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def open_store(uri: str) -> None:
    """Connect to the tracking store once: MLflow creates a new SQLite store's schema on first use (about
    3 s), which a sweep does while Ray starts."""
    MlflowClient(uri).search_experiments(max_results=1)


def _artifact_root(uri: str) -> str | None:
    """Embedded SQLite store: artifacts in `mlartifacts/` beside the database; a server decides itself."""
    database = sqlite_file(uri)
    return None if database is None else (database.parent / ARTIFACTS_DIR).as_uri()


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root(uri))


def _find_run(client: MlflowClient, experiment_id: str, **tags: str) -> Any:
    """The most recent run with these tags, or None."""
    where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"glmha": {"alpha": 0.4}}} -> {"model.glmha.alpha": 0.4}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def numeric_metrics(values: dict[str, Any], step: int) -> list[Metric]:
    """The numbers among `values` (bools and text left out) as MLflow metrics at `step`, stamped now."""
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[start : start + _BATCH])


# ------------------------------------------------------------------------------------------------
# the sweep driver


def _environment_tags() -> dict[str, str]:
    tags = {f"version.{name}": _version(name) for name in VERSIONED_PACKAGES}
    tags.update({"host": socket.gethostname(), "platform": platform.platform(), "mlflow.user": getpass.getuser()})
    source = Path(__file__).resolve().parents[1]
    commit = _git(source, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["restorch.git_dirty"] = str(bool(_git(source, "status", "--porcelain")))
    return tags


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(folder: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def open_sweep_run(spec: ExperimentSpec, sweep_path: str, *, resume: bool) -> dict[str, str]:
    """Create the sweep's parent run (or reopen it when resuming); returns the tracking settings
    that travel to the trials: uri, experiment_id, parent_run_id."""
    uri = resolve_uri(spec.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, spec.tracking.experiment or spec.name, uri)
    run = _find_run(client, experiment_id, **{SWEEP_TAG: sweep_path}) if resume else None
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": run.info.run_id}
    run = client.create_run(experiment_id, run_name=spec.name, tags={SWEEP_TAG: sweep_path, **_environment_tags()})
    run_id = run.info.run_id
    client.log_text(run_id, yaml.safe_dump(spec.as_written(), sort_keys=False), "spec.yaml")
    searched = {f"space.{d.key}": f"{d.kind} {d.values}" for d in spec.search_space}
    settings = {f"search.{key}": value for key, value in flatten(spec.config()["search"]).items()}
    log_params(client, run_id, {**searched, **settings, "trials": spec.trial_count()})
    return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": run_id}


def close_sweep_run(tracking: dict[str, str], *, failed: bool, files: dict[str, str], best: dict[str, Any]) -> None:
    """End the parent run: `files` (name -> text, e.g. results.csv) as artifacts, the best trial's
    row as `best.*` tags."""
    client = MlflowClient(tracking["uri"])
    run_id = tracking["parent_run_id"]
    for name, text in files.items():
        client.log_text(run_id, text, name)
    client.log_batch(run_id, tags=[RunTag(f"best.{key}", str(value)) for key, value in best.items()])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _trial_run(client: MlflowClient, tracking: dict[str, Any], trial_id: str) -> Any:
    return _find_run(client, tracking["experiment_id"], **{PARENT_TAG: tracking["parent_run_id"], TRIAL_TAG: trial_id})


class TrialStatusCallback(Callback):
    """Tune callback: the final status of child runs whose job did not end them itself (a trial
    stopped early by the scheduler or the time budget is KILLED; an errored trial is FAILED)."""

    def __init__(self, tracking: dict[str, str]) -> None:
        self.tracking = tracking

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id, "FAILED")

    def _close(self, trial_id: str, status: str) -> None:
        client = MlflowClient(self.tracking["uri"])
        run = _trial_run(client, self.tracking, trial_id)
        if run is None or run.info.status == "FINISHED":
            return
        if status == "KILLED":
            client.set_tag(run.info.run_id, STOPPED_TAG, "true")
        client.set_terminated(run.info.run_id, status=status)


def trial_statuses(spec: ExperimentSpec, sweep_path: str) -> dict[str, str]:
    """MLflow status of each trial's child run of the sweep stored at `sweep_path` (trial id -> status);
    empty when the store holds no such sweep. Creates nothing."""
    uri = resolve_uri(spec.tracking.uri)
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        return {}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    parent = experiment and _find_run(client, experiment.experiment_id, **{SWEEP_TAG: sweep_path})
    if not parent:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    return {run.data.tags[TRIAL_TAG]: run.info.status for run in runs if TRIAL_TAG in run.data.tags}


# ------------------------------------------------------------------------------------------------
# the driver side of a trial


def open_trial_run(tracking: dict[str, Any], trial_id: str, name: str) -> tuple[str, dict[str, float] | None]:
    """The trial's child run id (found, or created), and its last metrics if it already FINISHED
    (a trial Tune re-runs after a resume whose last state predates the trial's end)."""
    client = MlflowClient(tracking["uri"])
    run = _trial_run(client, tracking, trial_id)
    if run is None:
        run = client.create_run(tracking["experiment_id"], run_name=name,
                                tags={PARENT_TAG: tracking["parent_run_id"], TRIAL_TAG: trial_id})
    elif run.info.status == "FINISHED":
        return run.info.run_id, dict(run.data.metrics)
    else:
        client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id, None


def log_pbt_job(tracking: dict[str, Any], run_id: str, *, job: str, iteration: int, values: dict[str, Any],
                donor: str | None) -> None:
    """A pbt trial starts `job` at `iteration` with `values` (its searched keys): the numbers as metrics
    at that step (the history of the mutated lr / weight decay) and, when the job continues `donor`'s
    checkpoint (an exploitation), the tag EXPLOIT_TAG.{job} naming the iteration, donor and values."""
    client = MlflowClient(tracking["uri"])
    numbers = numeric_metrics(values, iteration)
    described = ", ".join(f"{key}={value}" for key, value in values.items())
    tags = [RunTag(f"{EXPLOIT_TAG}.{job}", f"iteration {iteration} from trial {donor}: {described}")] if donor else []
    client.log_batch(run_id, metrics=numbers, tags=tags)
