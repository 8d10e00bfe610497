"""One training job = one Ray Train `TorchTrainer` running workloads/train.py on every worker.

`restorch train` runs a job directly, tracked in an MLflow run of its own; a sweep trial
(orchestrator/run/sweep.py) builds the same trainer with the trial's config and child run. Either way rank 0
logs to the run through orchestrator/run/trial_job.py. Everything here runs on the driver; deepspeed is
never imported here.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from orchestrator.run.remote import check_for_cluster, check_shared_tracking, forwarded_env
from orchestrator.spec.schema import ExperimentSpec, SpecError
from orchestrator.run.timeline import mark
from workloads.job_config import (DataConfig, DeepSpeedConfig, IterationHook, JobConfig, JobStorage, ResourcesConfig,
                                  TaskConfig, TrackedRun, TrainConfig)

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Tests: a hook (workloads/job_config.IterationHook, as JSON) every job config gets; it reaches the jobs of
# sweep trials, which the tests cannot hand one otherwise.
TEST_HOOK_ENV = "RESTORCH_TEST_HOOK"
JOB_CONFIG_KEY = "job"  # the job config in Ray Train's train_loop_config
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
# Ray Train V2 settings of the embedded local Ray (each can be overridden from the environment).
LOCAL_TRAIN_SETTINGS = {
    # The controller polls its workers this often (default 2 s): each job start and end waits up to
    # one interval, a visible share of a short trial.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Train V2 also sends workers' print() through its logger: every progress line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # One machine is never drained for preemption; the watcher is one more actor process per job.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prometheus metrics of each job, read by no one here.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def job_config(spec: ExperimentSpec, job: str, storage_path: str, *, tracking: TrackedRun | None = None,
               test_hook: IterationHook | None = None) -> JobConfig:
    """What the job's workers run: the spec's sections (local paths made absolute), the job's name and
    storage, the MLflow run rank 0 logs to (`tracking`), and a test hook (`test_hook`, else $RESTORCH_TEST_HOOK)."""
    spec = pin_paths(spec)
    sections = spec.config()
    if test_hook is None and os.environ.get(TEST_HOOK_ENV):
        test_hook = IterationHook(**json.loads(os.environ[TEST_HOOK_ENV]))
    return JobConfig(
        model=sections["model"],
        task=TaskConfig(**sections["task"]),
        data=DataConfig(**sections["data"], schedule=spec.data.schedule_config()),
        train=TrainConfig(**sections["train"]),
        deepspeed=DeepSpeedConfig(**sections["deepspeed"]),
        resources=ResourcesConfig(**sections["resources"]),
        storage=JobStorage(storage_path, job, spec.storage.endpoint_url),
        tracking=tracking,
        test_hook=test_hook,
    )


def storage_path(spec: ExperimentSpec) -> str:
    """Absolute local path (Ray needs one) or the s3:// URI as written."""
    return absolute_storage(spec.storage.path)


def absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def pin_paths(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec with its local paths made absolute (data folders, storage): it then means the same in
    every process, whatever its working directory (Tune runs each trial in its own)."""
    storage = spec.storage.model_copy(update={"path": storage_path(spec)})
    return spec.model_copy(update={"data": spec.data.resolved(spec.storage.endpoint_url), "storage": storage})


def preflight(spec: ExperimentSpec, address: str | None, *, tracked: bool) -> None:
    """Refuse, before Ray starts, what cannot run: on a cluster (`address` or $RAY_ADDRESS), storage or
    (`tracked`: sweeps) tracking that its nodes do not share (orchestrator/run/remote.py; the resources are
    checked once connected: `check_cluster_resources`); on the embedded local Ray, what this machine
    can never run."""
    if on_cluster(address):
        check_for_cluster(spec, tracked=tracked)
        return
    check_local_resources(spec)
    spec.data.check_folders(spec.storage.endpoint_url)


def on_cluster(address: str | None) -> bool:
    """Whether a run connects to a Ray cluster (`--address` or $RAY_ADDRESS) rather than the embedded local Ray."""
    return bool(address or os.environ.get(RAY_ADDRESS_ENV))


def check_local_resources(spec: ExperimentSpec) -> None:
    """On the embedded local Ray, refuse what this machine can never run (before Ray starts)."""
    resources = spec.resources
    cpus = os.cpu_count() or 1
    needed = resources.num_workers * resources.cpus_per_worker
    if needed > cpus:
        raise SpecError(
            f"resources: {resources.num_workers} workers x {resources.cpus_per_worker} CPUs = {needed:g} CPUs per "
            f"trial, but this machine has {cpus}; lower resources.num_workers / cpus_per_worker or submit to a "
            "cluster with --address"
        )
    if resources.use_gpu or resources.gpus_per_worker:
        import torch

        if torch.cuda.device_count() < resources.num_workers * max(resources.gpus_per_worker, 1):
            raise SpecError(
                f"resources.use_gpu: the job needs {resources.num_workers} GPU worker(s) but this machine has "
                f"{torch.cuda.device_count()} GPU(s); set use_gpu: false or submit to a GPU cluster with --address"
            )


def worker_resources(spec: ExperimentSpec) -> dict[str, float]:
    """What one Ray Train worker of the job reserves."""
    resources = spec.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker or 1
    return per_worker


def check_cluster_resources(spec: ExperimentSpec) -> None:
    """On a connected cluster: refuse a trial that no size of the cluster could hold (it would wait
    forever); when it fits only once the autoscaler adds nodes, say so and go on (the job waits)."""
    import ray

    from orchestrator.run.autoscaler import cluster_node_types, plan_job

    waiting = plan_job(worker_resources(spec), spec.resources.num_workers, ray.cluster_resources(), cluster_node_types())
    if waiting:
        print(f"[restorch] {waiting}", flush=True)


def init_ray(address: str | None, *, local_resources: dict[str, float] | None = None) -> None:
    """Connect to a cluster (`--address` or $RAY_ADDRESS), or start the embedded local Ray with this
    machine's CPUs and `local_resources` (custom resources such as sweep trial slots)."""
    import ray
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set in a submitted job's driver

    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        # A driver outside the cluster hands its tracking/S3 variables to the job's processes on the nodes
        # (a submitted job has them already, from `restorch submit`'s runtime_env: Ray refuses a second copy).
        inside_job = RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ
        ray.init(address=address, runtime_env=None if inside_job else {"env_vars": forwarded_env()})
    else:
        start_local_ray(local_resources)


def start_local_ray(resources: dict[str, float] | None) -> None:
    """A new local Ray (never another one running on this machine) whose processes all know its
    address: Ray Train's placement-group cleaner looks its cluster up by address and, with two Ray
    instances on one machine and no $RAY_ADDRESS, fails, leaving stopped trials' CPUs reserved."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # read by ray.init when it starts the head node
    try:
        env_vars = {RAY_ADDRESS_ENV: f"{ray.util.get_node_ip_address()}:{port}",
                    **{name: os.environ.get(name, value) for name, value in LOCAL_TRAIN_SETTINGS.items()}}
        # The dashboard stays on (2 s of start-up): Train's placement-group cleaner asks its state API whether
        # a job's controller is alive, and without it never frees the CPUs of a trial that ASHA stopped.
        ray.init(address="local", num_cpus=os.cpu_count(), resources=resources, runtime_env={"env_vars": env_vars})
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV)
        else:
            os.environ[GCS_PORT_ENV] = previous


def make_trainer(spec: ExperimentSpec, config: JobConfig, *, callbacks: list[Any] | None = None,
                 keep_all_checkpoints: bool = False) -> Any:
    """The job's TorchTrainer, named and stored by `config.storage`; in a tracked job (`config.tracking`),
    rank 0 also logs to MLflow.
    `keep_all_checkpoints`: for pbt trials, whose checkpoints other trials may continue from."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workloads.storage import filesystem

    storage_filesystem, fs_path = filesystem(config.storage.path, spec.storage.endpoint_url)
    resources = spec.resources
    per_worker = worker_resources(spec)
    keep = None if keep_all_checkpoints else spec.search.keep_checkpoints
    return TorchTrainer(
        worker_entry,
        # Ray Train takes a dict (its run-state export validates one): the job config is its one entry.
        train_loop_config={JOB_CONFIG_KEY: config},
        # NCCL reduces CUDA tensors only: gloo takes any collective a GPU job makes on CPU tensors.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=config.storage.job,
            storage_path=fs_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep,
                                               checkpoint_score_attribute=spec.search.metric,
                                               checkpoint_score_order=spec.search.mode),
            callbacks=callbacks,
        ),
    )


def worker_entry(loop_config: dict[str, JobConfig]) -> Any:
    """What each Ray Train worker runs: the training loop, or in a tracked job (`config.tracking`: sweep
    trials, `restorch train`) the loop with rank 0 logging to the job's MLflow run. Imported here, in the
    worker: a module-level import would make the processes that only build the trainer (the driver, a
    sweep's trial actors) import the training recipe and MLflow's tracking client too."""
    mark("worker_started")
    config = loop_config[JOB_CONFIG_KEY]
    config.check_version()
    if config.tracking is not None:
        from orchestrator.run.trial_job import tracked_train_loop as train_loop
    else:
        from workloads.train import train_loop_per_worker as train_loop
    mark("worker_imported")
    return train_loop(config)


def run_job(spec: ExperimentSpec, *, address: str | None = None,
            test_hook: IterationHook | None = None) -> tuple[Any, str | None]:
    """Run (or resume, if a run of the same name exists in storage) one training job, tracked in an MLflow
    run like a sweep trial (the same run when resumed); returns Ray's Result and the run's id. On a cluster
    whose nodes share no tracking store (no MLflow server, e.g. a service that runs train jobs only) the
    job runs untracked, says why, and the id is None."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.runs import live_run_id, open_job_run

    preflight(spec, address, tracked=False)
    storage = storage_path(spec)
    untracked = unshared_tracking(spec, address)
    if untracked:
        print(f"[restorch] this job is not tracked in MLflow: {untracked}", flush=True)
    tracking = None if untracked else TrackedRun(**open_job_run(spec, f"{storage}/{spec.name}"))
    config = job_config(spec, spec.name, storage, tracking=tracking, test_hook=test_hook)
    init_ray(address)
    check_cluster_resources(spec)
    result = make_trainer(spec, config).fit()
    return result, tracking and live_run_id(MlflowClient(tracking.uri), tracking.run_id)


def unshared_tracking(spec: ExperimentSpec, address: str | None) -> str | None:
    """Why the job's nodes cannot log to its tracking store (a cluster, a store on one node's disk), or None."""
    if not on_cluster(address):
        return None
    try:
        check_shared_tracking(spec.tracking.uri)
    except SpecError as error:
        return str(error)
    return None
