"""One training job = one Ray Train `TorchTrainer` running workloads/train.py on every worker.

`restorch train` runs a job directly; a sweep trial (orchestrator/sweep.py) builds the same trainer
with the trial's config. Everything here runs on the driver; deepspeed is never imported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.spec import ExperimentSpec, SpecError

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def job_config(spec: ExperimentSpec, run_name: str, storage_path: str) -> dict[str, Any]:
    """The plain-data config the workers' training loop reads."""
    config = spec.config()
    config["data"]["schedule"] = spec.data.schedule_config()
    config["data"]["train"] = str(Path(spec.data.train).resolve())
    config["data"]["val"] = str(Path(spec.data.val).resolve())
    config["run"] = {"name": run_name, "storage_path": storage_path}
    return config


def storage_path(spec: ExperimentSpec) -> str:
    """Absolute local path (Ray needs one) or the s3:// URI as written."""
    path = spec.storage.path
    return path if "://" in path else str(Path(path).resolve())


def check_local_resources(spec: ExperimentSpec, concurrent_trials: int = 1) -> None:
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


def init_ray(address: str | None, **options: Any) -> None:
    """Connect to a cluster (`--address` or $RAY_ADDRESS), or start the embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=os.cpu_count(), **options)


def make_trainer(spec: ExperimentSpec, config: dict[str, Any], *, name: str, storage: str,
                 callbacks: list[Any] | None = None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workloads.train import train_loop_per_worker

    resources = spec.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.search.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def run_job(spec: ExperimentSpec, *, address: str | None = None, fault: dict[str, Any] | None = None) -> Any:
    """Run (or resume, if a run of the same name exists in storage) one training job; returns Ray's Result."""
    if not (address or os.environ.get(RAY_ADDRESS_ENV)):
        check_local_resources(spec)
    storage = storage_path(spec)
    config = job_config(spec, spec.name, storage)
    if fault:
        config["fault"] = fault
    init_ray(address)
    return make_trainer(spec, config, name=spec.name, storage=storage).fit()
