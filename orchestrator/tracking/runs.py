"""MLflow tracking of sweeps and jobs: one parent run per sweep, one nested child run per trial; one run
per `restorch train` job. Every tag, metric and artifact name comes from orchestrator/tracking/keys.py.

Who logs what:
- the sweep driver (orchestrator/run/sweep.py) opens the parent run (`open_sweep_run`: the spec as an
  artifact, the searched space, the search settings, git commit, versions, host), ends the child runs
  that Tune ended without their job finishing (`TrialStatusCallback`: a trial that the scheduler or the
  time budget stopped is FINISHED with the tags STOPPED_BY_TAG and STOPPED_AT_TAG; an errored one FAILED)
  and finally the parent run itself (`close_sweep_run`, with the results table);
- the driver side of each trial (the Tune function trainable) finds or creates the trial's child run
  (`open_trial_run`), so that a trial re-run after a failure or a resume continues the same run;
- `restorch train` (orchestrator/jobs.run_job) opens the job's run (`open_job_run`: the spec as an
  artifact, git commit, versions, host; the same run again when the job is resumed);
- rank 0 of the job's Ray Train workers (`tracked_train_loop` in orchestrator/run/trial_job.py, the workers'
  entry point of trials and jobs alike) logs everything else into it: flattened params (the model's
  with every default filled in), the metric protocol and validation data, the model's size, each
  report's metrics, the latest checkpoint's location, the final consolidated model (`model/model.pt`)
  and the status;
- a pbt trial's driver side also logs each job it starts (`log_pbt_job`): its lr / weight decay as
  metrics at the start iteration and, when it continues another trial's checkpoint, a tag naming it.

One history per run: a job that starts over from a checkpoint at iteration N (a worker crashed, the
sweep or the job was resumed) re-runs the iterations after N, which its run may already hold from the
attempt that died. MLflow cannot delete logged values, so the new attempt continues in a new run
(`restart_history`): the old run's params, tags, artifacts and metric history up to step N (its system
metrics whole: tracking/system_metrics.py) are copied into it, it takes the old run's place (same name, parent and trial tags, ATTEMPT_TAG counting the
attempts, REPLACES_TAG naming the old run) and the old run is tagged REPLACED_BY_TAG and deleted (MLflow
keeps deleted runs until `mlflow gc`; `mlflow runs restore` brings one back). So the steps re-run after a
checkpoint replace the earlier ones, each step is in the history once, and the run's latest values, which
`restorch report` and the registry read, are the final ones. Code holding a run id of an earlier attempt
follows REPLACED_BY_TAG (`live_run_id`).

The tracking URI is the spec's `tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded
`sqlite:///mlflow.db` with artifacts in `mlartifacts/`, both in the working directory. It is made
absolute (`resolve_uri` in orchestrator/tracking/store.py, with every search of the store) and travels
to the trials and workers in their config, so every process logs to the same store (nothing falls back
to a worker-local `mlruns/`).
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import yaml
from mlflow.entities import LifecycleStage, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.utils import flatten_dict

from orchestrator.spec.schema import ExperimentSpec
from orchestrator.tracking.keys import (ATTEMPT_TAG, BEST_PREFIX, EXPLOIT_TAG, ITERATION, JOB_TAG, PARENT_TAG,
                                        REPLACED_BY_TAG, REPLACES_TAG, SEARCH_PREFIX, SPACE_PREFIX, SPEC_ARTIFACT,
                                        STOPPED_AT_TAG, STOPPED_BY_TAG, SWEEP_TAG, SYSTEM_PREFIX, TRIAL_TAG,
                                        TRIALS_PARAM)
from orchestrator.tracking.record import dataset_digests, log_record, resources_tags
from orchestrator.tracking.store import (child_runs, experiment_id, get_or_create_experiment, latest_run, resolve_uri,
                                         sqlite_file)

_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch
_METRIC_BATCH = 1000


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"glmha": {"alpha": 0.4}}} -> {"model.glmha.alpha": 0.4}: nested sections as MLflow param
    names (Tune's flatten_dict; lists and None stay values)."""
    return flatten_dict(tree, delimiter=".")


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


def _log_spec_record(client: MlflowClient, run_id: str, spec: ExperimentSpec) -> None:
    """The spec as run (an artifact) and the reproducibility record of a sweep's or a job's run: the
    resources and precision as the spec asks (the workers log the machine they ran on: MACHINE_TAG)."""
    client.log_text(run_id, yaml.safe_dump(spec.as_written(), sort_keys=False), SPEC_ARTIFACT)
    resources = spec.resources
    device = resources_tags(resources.use_gpu, resources.num_workers, resources.cpus_per_worker, resources.gpus_per_worker)
    log_record(client, run_id, seed=spec.train.seed, datasets=dataset_digests(spec.data.folders(), spec.data.digests),
               dtype=spec.deepspeed.precision, device=device)


def open_sweep_run(spec: ExperimentSpec, sweep_path: str, *, resume: bool) -> dict[str, str]:
    """Create the sweep's parent run (or reopen it when resuming); returns the tracking settings
    that travel to the trials: uri, experiment_id, parent_run_id."""
    uri = resolve_uri(spec.tracking.uri)
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, spec.tracking.experiment or spec.name, uri)
    run = latest_run(client, {SWEEP_TAG: sweep_path}, [experiment]) if resume else None
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return {"uri": uri, "experiment_id": experiment, "parent_run_id": run.info.run_id}
    run_id = client.create_run(experiment, run_name=spec.name, tags={SWEEP_TAG: sweep_path}).info.run_id
    _log_spec_record(client, run_id, spec)
    searched = {f"{SPACE_PREFIX}{d.key}": f"{d.kind} {d.values}" for d in spec.search_space}
    settings = {f"{SEARCH_PREFIX}{key}": value for key, value in flatten(spec.config()["search"]).items()}
    log_params(client, run_id, {**searched, **settings, TRIALS_PARAM: spec.trial_count()})
    return {"uri": uri, "experiment_id": experiment, "parent_run_id": run_id}


def close_sweep_run(tracking: dict[str, str], *, failed: bool, files: dict[str, str], best: dict[str, Any]) -> None:
    """End the parent run: `files` (name -> text, e.g. results.csv) as artifacts, the best trial's
    row as `best.*` tags."""
    client = MlflowClient(tracking["uri"])
    run_id = tracking["parent_run_id"]
    for name, text in files.items():
        client.log_text(run_id, text, name)
    client.log_batch(run_id, tags=[RunTag(f"{BEST_PREFIX}{key}", str(value)) for key, value in best.items()])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _trial_run(client: MlflowClient, tracking: dict[str, Any], trial_id: str) -> Any:
    return latest_run(client, {PARENT_TAG: tracking["parent_run_id"], TRIAL_TAG: trial_id}, [tracking["experiment_id"]])


class TrialStatusCallback(Callback):
    """Tune callback: the final status of child runs whose job did not end them itself. A trial stopped
    early is FINISHED, with the tags STOPPED_BY_TAG (the scheduler, e.g. asha, or `time budget`) and
    STOPPED_AT_TAG (its last iteration); an errored trial is FAILED."""

    scheduler = "scheduler"  # callbacks pickled by sweeps stored before it was an argument

    def __init__(self, tracking: dict[str, str], scheduler: str = "scheduler") -> None:
        self.tracking, self.scheduler = tracking, scheduler

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        budget = (trial.stopping_criterion or {}).get("time_total_s")
        stopped_by = "time budget" if budget and last.get("time_total_s", 0) >= budget else self.scheduler
        self._close(trial.trial_id, "FINISHED", {STOPPED_BY_TAG: stopped_by, STOPPED_AT_TAG: str(last.get(ITERATION, 0))})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id, "FAILED", {})

    def _close(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        client = MlflowClient(self.tracking["uri"])
        run = _trial_run(client, self.tracking, trial_id)
        if run is None or run.info.status == "FINISHED":
            return
        client.log_batch(run.info.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        client.set_terminated(run.info.run_id, status=status)


def run_state(run: Any) -> str:
    """What `restorch status` shows of a run: its MLflow status, or `stopped at N (asha)`."""
    tags = run.data.tags
    if run.info.status == "FINISHED" and STOPPED_BY_TAG in tags:
        return f"stopped at {tags.get(STOPPED_AT_TAG, '?')} ({tags[STOPPED_BY_TAG]})"
    return run.info.status


def trial_statuses(spec: ExperimentSpec, sweep_path: str) -> dict[str, str]:
    """The state (`run_state`) of each trial's child run of the sweep stored at `sweep_path` (trial id -> status);
    empty when the store holds no such sweep. Creates nothing."""
    uri = resolve_uri(spec.tracking.uri)
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        return {}
    client = MlflowClient(uri)
    experiment = experiment_id(client, spec.tracking.experiment or spec.name)
    parent = experiment and latest_run(client, {SWEEP_TAG: sweep_path}, [experiment])
    if not parent:
        return {}
    runs = child_runs(client, parent.info.run_id)
    return {run.data.tags[TRIAL_TAG]: run_state(run) for run in runs if TRIAL_TAG in run.data.tags}


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
        log_record(client, run.info.run_id, device={})  # the trial's resources and data: the sweep run's record
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
    run_id = live_run_id(client, run_id)
    numbers = numeric_metrics(values, iteration)
    described = ", ".join(f"{key}={value}" for key, value in values.items())
    tags = [RunTag(f"{EXPLOIT_TAG}.{job}", f"iteration {iteration} from trial {donor}: {described}")] if donor else []
    client.log_batch(run_id, metrics=numbers, tags=tags)


# ------------------------------------------------------------------------------------------------
# a `restorch train` job


def open_job_run(spec: ExperimentSpec, location: str) -> dict[str, str]:
    """The run of the job stored at `location` (created, or found when the job is resumed), with the spec
    as an artifact; returns what its workers log with: uri, run_id."""
    uri = resolve_uri(spec.tracking.uri)
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, spec.tracking.experiment or spec.name, uri)
    run = latest_run(client, {JOB_TAG: location}, [experiment])
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return {"uri": uri, "run_id": run.info.run_id}
    run = client.create_run(experiment, run_name=spec.name, tags={JOB_TAG: location})
    _log_spec_record(client, run.info.run_id, spec)
    return {"uri": uri, "run_id": run.info.run_id}


# ------------------------------------------------------------------------------------------------
# attempts: one history per run


def live_run_id(client: MlflowClient, run_id: str) -> str:
    """`run_id`, or the run that continues it if a later attempt replaced it (`restart_history`)."""
    run = client.get_run(run_id)
    while run.info.lifecycle_stage == LifecycleStage.DELETED and REPLACED_BY_TAG in run.data.tags:
        run = client.get_run(run.data.tags[REPLACED_BY_TAG])
    return run.info.run_id


def restart_history(client: MlflowClient, run_id: str, resumed_from: int) -> str:
    """The run a job attempt that resumed at iteration `resumed_from` logs to: `run_id` if its history
    goes no further, else a new run that replaces it with the history up to `resumed_from` (see the
    module's docstring)."""
    logged = client.get_metric_history(run_id, ITERATION)
    if not logged or max(metric.step for metric in logged) <= resumed_from:
        return run_id
    old = client.get_run(run_id)
    tags = {key: value for key, value in old.data.tags.items() if key != "mlflow.runName"}
    attempt = int(tags.get(ATTEMPT_TAG, "1")) + 1
    new_id = client.create_run(old.info.experiment_id, start_time=old.info.start_time, run_name=old.info.run_name,
                               tags={**tags, ATTEMPT_TAG: str(attempt), REPLACES_TAG: run_id}).info.run_id
    log_params(client, new_id, old.data.params)
    # the machine's use (system metrics, by sample) counts in full: that attempt did use it
    history = [metric for key in old.data.metrics for metric in client.get_metric_history(run_id, key)
               if metric.step <= resumed_from or key.startswith(SYSTEM_PREFIX)]
    for start in range(0, len(history), _METRIC_BATCH):
        client.log_batch(new_id, metrics=history[start : start + _METRIC_BATCH])
    if client.list_artifacts(run_id):
        with tempfile.TemporaryDirectory(prefix="restorch-attempt-") as folder:
            client.log_artifacts(new_id, client.download_artifacts(run_id, "", folder))
    client.set_tag(run_id, REPLACED_BY_TAG, new_id)
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)
    return new_id
