"""Rank 0 of a tracked Ray Train job (a sweep trial, or `restorch train`): the training loop, logging to
the job's MLflow run.

The workers' entry point of every tracked job (orchestrator/run/jobs.make_trainer). It also computes the
model's size metrics (params, MACs), so that a trial's Tune actor never has to import torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from models.profile import size_metrics
from models.registry import full_options
from orchestrator.tracking.keys import (CHECKPOINT_PATH_TAG, DATA_TAG, DTYPE_TAG, MACHINE_TAG, MODEL_ARTIFACT, MODEL_TAG,
                                        PROTOCOL_TAG, PROTOCOL_VERSION_TAG)
from orchestrator.tracking.record import log_val_benchmarks, reported_checkpoint_tags
from orchestrator.tracking.runs import flatten, live_run_id, log_params, numeric_metrics, restart_history
from orchestrator.tracking.system_metrics import SystemMetrics
from workloads.metrics import PROTOCOL_VERSION
from workloads.session import RayTrainSession, Session, TrialStopped
from workloads.tasks import get_task
from workloads.job_config import JobConfig
from workloads.train import CONSOLIDATED_MODEL, machine_name, resolved_precision, run_training


class TrackedSession:
    """A Ray Train session whose reports are also logged to the job's run (rank 0 only). The first report
    of an attempt that resumed from a checkpoint moves to a clean run if needed (`restart_history`), and the
    machine's system metrics (`machine`) with it."""

    def __init__(self, session: RayTrainSession, client: MlflowClient, run_id: str, sizes: dict[str, float],
                 machine: SystemMetrics) -> None:
        self.session, self.client, self.run_id, self.sizes, self.machine = session, client, run_id, sizes, machine
        self.rank, self.world_size = session.rank, session.world_size
        self.attempt_checked = False

    def resume_directory(self) -> Any:
        return self.session.resume_directory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        if not self.attempt_checked:
            self.machine.stop()  # its last samples go to the attempt's run before restart_history may replace it
            self.run_id = restart_history(self.client, self.run_id, int(metrics["resumed_from"]))
            self.attempt_checked = True
            self.machine.follow(self.run_id)
        step = int(metrics["iteration"])
        numbers = numeric_metrics(metrics, step)
        tags = [RunTag(CHECKPOINT_PATH_TAG, metrics["checkpoint_path"])] if "checkpoint_path" in metrics else []
        self.client.log_batch(self.run_id, metrics=numbers, tags=tags)
        if checkpoint_dir is not None and (Path(checkpoint_dir) / CONSOLIDATED_MODEL).exists():
            self.client.log_artifact(self.run_id, str(Path(checkpoint_dir) / CONSOLIDATED_MODEL), Path(MODEL_ARTIFACT).parent.name)
            self.client.set_tag(self.run_id, MODEL_TAG, MODEL_ARTIFACT)
        # Tune ranks trials by these too (e.g. an objective on params_m), so every report carries them.
        self.session.report({**metrics, **self.sizes}, checkpoint_dir=checkpoint_dir, checkpoint_name=checkpoint_name)


def run_params(config: JobConfig) -> dict[str, Any]:
    """The job config's sections as flat params, the model's with every option it runs with."""
    sections = config.sections()
    sections["model"] = full_options(config.model)
    # data.digests maps dataset URIs to digests: a URI is no MLflow param name, so they make one param.
    digests = sections["data"].pop("digests")
    if digests:
        sections["data"]["digests"] = _digests(digests)
    return flatten(sections)


def result_tags(config: JobConfig) -> dict[str, str]:
    """What the run's metrics mean: the task's metric protocol (and its version), the validation data, the
    machine (this one: rank 0's) that the timings are measured on."""
    task = get_task(config.task.name, sigma=config.task.sigma)
    val, digests = config.data.val_folders, config.data.digests
    data = ", ".join(f"{name}: {folder}" for name, folder in val.items()) if isinstance(val, dict) else str(val)
    return {PROTOCOL_TAG: task.protocol.describe(), PROTOCOL_VERSION_TAG: str(PROTOCOL_VERSION),
            DATA_TAG: f"{data}; digests {_digests(digests)}" if digests else data,
            MACHINE_TAG: machine_name(config.resources.use_gpu), DTYPE_TAG: resolved_precision(config.deepspeed.precision)}


def _digests(digests: dict[str, str]) -> str:
    return " ".join(f"{uri}={digest}" for uri, digest in digests.items())


def tracked_train_loop(config: JobConfig, session: Session | None = None) -> dict[str, Any]:
    """Entry point of a tracked job's Ray Train workers (or of an inline trial, with its `session`): the
    training loop, with rank 0 logging to the job's run (`config.tracking`) and adding the model's size metrics."""
    session = session or RayTrainSession()
    if session.rank != 0:
        return run_training(config, session)
    client = MlflowClient(config.tracking.uri)
    run_id = live_run_id(client, config.tracking.run_id)
    sizes = size_metrics(config.model)
    logged = client.get_run(run_id).data.params
    if not logged:  # the job's first run
        client.log_batch(run_id, metrics=numeric_metrics(sizes, 0),
                         tags=[RunTag(key, value) for key, value in result_tags(config).items()])
    # MLflow refuses to change a param: a job run again (resumed, a pbt trial's next segment or job) logs only
    # new keys; a pbt trial's changed values are metrics and tags (log_pbt_job).
    log_params(client, run_id, {key: value for key, value in run_params(config).items() if key not in logged})
    machine = SystemMetrics(config.tracking.uri, run_id)
    tracked = TrackedSession(session, client, run_id, sizes, machine)
    try:
        if not logged:
            log_val_benchmarks(client, run_id, config)
        result = run_training(config, tracked)
    except TrialStopped:  # the scheduler stopped the trial: its Tune callback closes the run (TrialStatusCallback)
        raise
    except BaseException:
        client.set_terminated(tracked.run_id, status="FAILED")
        raise
    finally:
        machine.stop()
    client.log_batch(tracked.run_id, tags=[RunTag(key, value) for key, value in reported_checkpoint_tags(result).items()])
    if config.stop_iteration >= config.train.iterations:  # else a pbt segment ended: the trial goes on
        client.set_terminated(tracked.run_id, status="FINISHED")
    return result
