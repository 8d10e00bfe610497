"""The job config: everything a Ray Train worker of one training job needs, typed and versioned.

Built once per job from the validated experiment spec (orchestrator/run/jobs.py: `job_config`), shipped
by `make_trainer` in the workers' `train_loop_config` (Ray pickles it), read by workloads/train.py and
orchestrator/run/trial_job.py as attributes.

The spec's sections the workers read (task, data, train, deepspeed, resources) are mirrored here as
plain dataclasses, field for field, with no defaults and no checks: the pydantic schema
(orchestrator/spec/schema.py) stays the one place for both, and this module stays importable without
it (the workers import neither the orchestrator nor pydantic for it). A field the schema adds or drops
fails `job_config` at once (the mirror is built with `Section(**spec_section)`). `model` stays the model
registry's plain config (models/registry.py owns its options). What only orchestration sets has fields
of its own: where checkpoints go (`storage`), the MLflow run rank 0 reports to (`tracking`), the pbt
segment (`segment`) and a test hook (`test_hook`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1  # bump when a field changes meaning: a worker refuses a config of another version


@dataclass(frozen=True)
class TaskConfig:
    name: str
    sigma: float | None


@dataclass(frozen=True)
class DataConfig:
    train: str
    val: str | dict[str, str | dict[str, str]]  # a folder, or named sets {name: folder or {benchmark, path}}
    patch_size: int | None
    batch_size: int | None
    patch_sizes: list[int] | None
    batch_sizes: list[int] | None
    stage_iterations: list[int] | None
    max_val_images: int | None
    num_workers: int | None
    cache_dir: str | None
    digests: dict[str, str]
    schedule: dict[str, Any]  # the fields above as workloads.data.PatchSchedule's config

    @property
    def val_folders(self) -> str | dict[str, str]:
        """The validation folder, or each named set's folder."""
        if isinstance(self.val, str):
            return self.val
        return {name: entry if isinstance(entry, str) else entry["path"] for name, entry in self.val.items()}

    @property
    def val_benchmarks(self) -> dict[str, str]:
        """The named sets that are catalogued benchmarks (workloads/benchmarks.py): set name -> benchmark name."""
        entries = self.val.items() if isinstance(self.val, dict) else []
        return {name: entry["benchmark"] for name, entry in entries if isinstance(entry, dict)}


@dataclass(frozen=True)
class TrainConfig:
    iterations: int
    lr: float
    weight_decay: float
    betas: list[float]
    warmup_iterations: int
    constant_iterations: int | None
    min_lr: float
    grad_clip: float
    grad_accumulation: int
    val_every: int
    checkpoint_every: int
    log_every: int
    seed: int
    max_failures: int


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int
    precision: str  # auto, fp32 or bf16


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    trial_mode: str = "auto"  # a sweep trial's: inline or a Ray Train job (orchestrator/spec/schema.ResourcesSpec)


@dataclass(frozen=True)
class JobStorage:
    """Where the job's checkpoints go: `{path}/{job}/checkpoint_*` (Ray Train's run folder), through
    `endpoint_url` on S3 (also the endpoint of remote datasets)."""
    path: str
    job: str
    endpoint_url: str | None = None

    @property
    def folder(self) -> str:
        return f"{self.path}/{self.job}"


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run rank 0 logs to (a sweep trial's child run, or `restorch train`'s run)."""
    uri: str
    run_id: str


@dataclass(frozen=True)
class PbtSegment:
    """A pbt trial's fit of its job: it stops at `stop_at` (the lr schedule still spans train.iterations);
    a new job without a checkpoint of its own starts from `init_from` (a ray.train.Checkpoint of the
    trial it continues), if given."""
    stop_at: int
    init_from: Any = None


@dataclass(frozen=True)
class IterationHook:
    """Tests only: `function` of the Python file `path`, called on every rank before each iteration as
    function(step=..., rank=..., **options) (tests/faults.py crashes a worker with it). A file, not a
    module name: the tests' folder is on no worker's import path."""
    path: str
    function: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load(self) -> Callable[..., None]:
        spec = importlib.util.spec_from_file_location(f"restorch_hook_{Path(self.path).stem}", self.path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        function = getattr(module, self.function)
        return lambda **where: function(**where, **self.options)


@dataclass(frozen=True)
class JobConfig:
    model: dict[str, Any]  # the model registry's config (models/registry.py)
    task: TaskConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    resources: ResourcesConfig
    storage: JobStorage
    tracking: TrackedRun | None = None  # None: an untracked job
    segment: PbtSegment | None = None  # None: the job runs to train.iterations
    test_hook: IterationHook | None = None
    version: int = VERSION

    @property
    def stop_iteration(self) -> int:
        """Where this fit of the job stops: train.iterations, or the end of a pbt segment."""
        return self.segment.stop_at if self.segment else self.train.iterations

    def sections(self) -> dict[str, Any]:
        """The spec's sections the job runs with, as plain data (what its MLflow run logs as params)."""
        return {"model": self.model, **{name: dataclasses.asdict(getattr(self, name))
                                        for name in ("task", "data", "train", "deepspeed", "resources")}}

    def check_version(self) -> None:
        if self.version != VERSION:
            raise RuntimeError(f"this job config is version {self.version}, but the worker's restorch reads version "
                               f"{VERSION}: install the driver's restorch version on every node")
