"""Rank 0 of a sweep trial's Ray Train job: the training loop, logging to the trial's MLflow child run.

The workers' entry point in sweeps (orchestrator/jobs.make_trainer). It also computes the model's size
metrics (params, MACs), so that the trial's Tune actor never has to import torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from models.profile import size_metrics
from orchestrator.tracking import CHECKPOINT_TAG, log_params, flatten, numeric_metrics
from workloads.session import RayTrainSession
from workloads.train import CONSOLIDATED_MODEL, run_training, stop_iteration



class TrackedSession:
    """A Ray Train session whose reports are also logged to the trial's child run (rank 0 only)."""

    def __init__(self, session: RayTrainSession, client: MlflowClient, run_id: str, sizes: dict[str, float]) -> None:
        self.session, self.client, self.run_id, self.sizes = session, client, run_id, sizes
        self.rank, self.world_size = session.rank, session.world_size

    def resume_directory(self) -> Any:
        return self.session.resume_directory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        step = int(metrics["iteration"])
        numbers = numeric_metrics(metrics, step)
        tags = [RunTag(CHECKPOINT_TAG, metrics["checkpoint_path"])] if "checkpoint_path" in metrics else []
        self.client.log_batch(self.run_id, metrics=numbers, tags=tags)
        if checkpoint_dir is not None and (Path(checkpoint_dir) / CONSOLIDATED_MODEL).exists():
            self.client.log_artifact(self.run_id, str(Path(checkpoint_dir) / CONSOLIDATED_MODEL), "model")
        # Tune ranks trials by these too (e.g. an objective on params_m), so every report carries them.
        self.session.report({**metrics, **self.sizes}, checkpoint_dir=checkpoint_dir, checkpoint_name=checkpoint_name)


def tracked_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a sweep trial's Ray Train workers: the training loop, with rank 0 logging to
    the trial's child run (`config["trial_run"]`: uri, run_id) and adding the model's size metrics."""
    session = RayTrainSession()
    if session.rank != 0:
        return run_training(config, session)
    tracking = config["trial_run"]
    client = MlflowClient(tracking["uri"])
    run_id = tracking["run_id"]
    sections = {key: config[key] for key in ("model", "task", "data", "train", "deepspeed", "resources")}
    # data.digests maps dataset URIs to digests: a URI is no MLflow param name, so they make one param.
    data = dict(sections["data"])
    digests = data.pop("digests", None)
    sections["data"] = {**data, **({"digests": " ".join(f"{uri}={d}" for uri, d in digests.items())} if digests else {})}
    sizes = size_metrics(config["model"])
    logged = client.get_run(run_id).data.params
    if not logged:  # the trial's first job run
        client.log_batch(run_id, metrics=numeric_metrics(sizes, 0))
    # MLflow refuses to change a param: a job run again (resumed, a pbt trial's next segment or job) logs only
    # new keys; a pbt trial's changed values are metrics and tags (log_pbt_job).
    log_params(client, run_id, {key: value for key, value in flatten(sections).items() if key not in logged})
    try:
        result = run_training(config, TrackedSession(session, client, run_id, sizes))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    if stop_iteration(config) >= config["train"]["iterations"]:  # else a pbt segment ended: the trial goes on
        client.set_terminated(run_id, status="FINISHED")
    return result
