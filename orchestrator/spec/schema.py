"""The experiment spec: one YAML schema for `restorch train`, `restorch sweep` (and ablations).

    name: derain-glmha
    model: {name: restormer, dim: 16, attention: glmha, glmha: {alpha: {grid: [0.4, 0.6]}}}
    task: deraining                     # or {name: gaussian_denoising, sigma: 25}
    data: {train: data/rain-mini/train, val: data/rain-mini/val, patch_size: 64, batch_size: 4}
                                        # batch_size: the global batch of a step, split over the workers
                                        # or several named sets: val: {Rain100L: PATH, Rain100H: PATH}
                                        # a named set may be a catalogued benchmark, checked against it before
                                        # anything runs: val: {Rain100H: {benchmark: Rain100H, path: PATH}}
    train: {iterations: 200, lr: 3.0e-4, val_every: 50}
    deepspeed: {zero_stage: 1}
    resources: {num_workers: 1, cpus_per_worker: 1}
    search: {algorithm: grid, scheduler: asha, metric: psnr, mode: max}

Any value under `model`, `train` or `data` may be a search-space entry (`{choice: [...]}`,
`{grid: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`,
`{quniform: [lo, hi, q]}`). A value of a `choice` or `grid` may carry a sub-space, searched only in the
trials that take that value: `attention: {choice: [csa, {value: glmha, with: {glmha.alpha: {uniform:
[0.2, 1.0]}}}]}` (keys in `with` are relative to the section, here `model`). `load_spec` separates them
into `ExperimentSpec.search_space` (dotted keys such as `model.glmha.alpha`; a sub-space's entries name
the entry and value that switch them on) and validates everything, every candidate value included,
before anything runs. Specs are data only, read by `read_spec_yaml` (yaml.SafeLoader with bounds on
the text's size, its nesting and its aliases' expansion, checked while composing, before any object is
built) and `load_spec_text` / `load_spec`; search spaces and model sizes are bounded before any model
is built, so validating a spec takes bounded time and memory.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEARCHABLE_SECTIONS = ("model", "train", "data")


DOMAIN_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


DEFAULT_MAX_TRIALS = 64


DEFAULT_STORAGE = "restorch_runs"


# Model-size metrics every sweep trial reports next to the task's validation metrics (from models.profile).
PROFILE_METRICS = ("params_m", "conv_gmacs", "total_gmacs")


# The search-space key of an ablation's variants (a grid over their labels; see resolve_trial).
VARIANT_KEY = "ablation.variant"


# What pbt may mutate: the values a trial continuing another trial's state can set (workloads/train.py).
PBT_MUTABLE = ("train.lr", "train.weight_decay")


# Searchers that sample their own points (Optuna's samplers, BOHB): no grid entries.
SAMPLING_ALGORITHMS = ("optuna", "optuna_multi", "gp", "cmaes", "bohb")


# median stopping compares a trial with this many others that reached its iteration (Ray's default).
MEDIAN_MIN_OTHERS = 3


# A validation set's name: it names the metrics reported on that set (psnr/Rain100L) and the report's columns.
VAL_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# Bounds on spec text and data (the recipes: under 3 KB, 9 levels deep, 120 nodes).
MAX_SPEC_BYTES = 256 * 1024


MAX_SPEC_DEPTH = 32


MAX_SPEC_NODES = 20_000  # YAML nodes with every alias expanded (an alias bomb stands for billions)


# Bounds on the work of validating a spec, counted before any model is built.
MAX_SEARCH_TRIALS = 10_000  # trials of a search space, even with --yes


MAX_CHECKED_MODELS = 64  # distinct model candidate values or ablation variants, each built to check it


# Bounds on a model's size options (the papers' models: dims <= 48, <= 8 blocks per level, <= 8 heads)
# and on its parameters (Restormer: 26 M).
MODEL_OPTION_LIMITS = {"dim": 512, "inp_channels": 512, "out_channels": 512, "head_dim": 512, "num_blocks": 64,
                       "num_refinement_blocks": 64, "heads": 64, "num_stages": 16, "depth": 64}


MAX_MODEL_PARAMS = 1_000_000_000


class SpecError(ValueError):
    """An experiment spec that cannot run; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Section):
    name: str
    sigma: float | None = Field(None, description="noise level (0..255) for gaussian_denoising")


class ValSetSpec(_Section):
    """A validation set that is a catalogued benchmark (workloads/benchmarks.py): its folder is checked against
    the catalogue's entry before anything runs (orchestrator/spec/checks.py), and its metrics carry the
    benchmark's protocol and the folder's content digest."""
    benchmark: str = Field(description="the benchmark's name in the catalogue (`restorch data benchmarks`)")
    path: str = Field(min_length=1, description="its folder or URI, laid out as the benchmark's release")


class DataSpec(_Section):
    train: str = Field(description="training dataset folder (or a folder holding a train/ split), or its URI "
                                   "(s3://bucket/prefix, staged once per node)")
    val: str | dict[str, str | ValSetSpec] = Field(
        description="validation dataset folder or URI (whole images), or several named sets {Rain100L: folder, "
                    "Rain100H: folder}: the loop then reports each metric per set (psnr/Rain100L) and their mean (psnr); "
                    "a named set may be a catalogued benchmark, {Rain100H: {benchmark: Rain100H, path: folder}}")
    patch_size: int | None = Field(None, ge=8, description="fixed training patch size (one stage)")
    batch_size: int | None = Field(None, ge=1, description="global batch per optimizer step (one stage): all workers "
                                   "together, each computing batch_size / (resources.num_workers x "
                                   "train.grad_accumulation) samples at a time; default 4")
    patch_sizes: list[int] | None = Field(None, description="progressive schedule: patch size per stage")
    batch_sizes: list[int] | None = Field(None, description="progressive schedule: global batch per stage")
    stage_iterations: list[int] | None = Field(None, description="progressive schedule: iterations per stage")
    max_val_images: int | None = Field(None, ge=1, description="validate on the first N images only")
    num_workers: int | None = Field(None, ge=0, description="loader processes per training worker, making batches "
                                    "while the step runs; default cpus_per_worker - 1, at least 1 and at most 8")
    cache_dir: str | None = Field(None, description="each node's cache of staged and decoded datasets (a local "
                                  "disk); default $RESTORCH_CACHE_DIR, else ~/.cache/restorch")
    digests: dict[str, str] = Field(default_factory=dict, description="content digest of each remote dataset "
                                    "(URI -> digest), pinned by restorch when a run or sweep starts: a worker that "
                                    "finds the dataset changed since then stops")

    @field_validator("val", mode="before")
    @classmethod
    def _named_sets(cls, val: Any) -> Any:
        if not isinstance(val, Mapping):
            return val
        if not val:
            raise ValueError("give the validation folder, or one or more named sets {name: folder}")
        for name, folder in val.items():
            if not isinstance(name, str) or not VAL_SET_NAME.match(name):
                raise ValueError(f"validation set name {name!r}: use letters, digits, _ . - (it names the set's "
                                 "metrics, e.g. psnr/Rain100L)")
            if isinstance(folder, Mapping):
                _check_benchmark_set(name, folder)
                continue
            if not isinstance(folder, str) or not folder:
                raise ValueError(f"validation set {name!r} has no folder; write {name}: path/to/its/folder "
                                 f"(or {name}: {{benchmark: NAME, path: folder}})")
        return val

    @property
    def val_sets(self) -> dict[str, str]:
        """The named validation sets (name -> folder); empty for a single `val` folder."""
        if not isinstance(self.val, dict):
            return {}
        return {name: entry if isinstance(entry, str) else entry.path for name, entry in self.val.items()}

    @property
    def val_benchmarks(self) -> dict[str, str]:
        """The named validation sets that are catalogued benchmarks: set name -> benchmark name."""
        entries = self.val.items() if isinstance(self.val, dict) else []
        return {name: entry.benchmark for name, entry in entries if isinstance(entry, ValSetSpec)}

    def folders(self) -> dict[str, str]:
        """Every dataset folder by its key: data.train, and data.val or data.val.NAME per named set."""
        val = {f"data.val.{name}": folder for name, folder in self.val_sets.items()} or {"data.val": self.val}
        return {"data.train": self.train, **val}

    def resolved(self, endpoint_url: str | None = None) -> DataSpec:
        """A copy with the local folders made absolute (they mean the same in every working directory)
        and each remote dataset's digest pinned, unless already (`endpoint_url`: storage.endpoint_url)."""
        from workloads.staging import is_uri

        def absolute(folder: str) -> str:
            return folder if is_uri(folder) else str(Path(folder).resolve())

        if isinstance(self.val, dict):
            val = {name: absolute(entry) if isinstance(entry, str) else entry.model_copy(update={"path": absolute(entry.path)})
                   for name, entry in self.val.items()}
        else:
            val = absolute(self.val)
        digests = {uri: self.digests.get(uri) or _remote(key, uri, endpoint_url).digest
                   for key, uri in self.folders().items() if is_uri(uri)}
        return self.model_copy(update={"train": absolute(self.train), "val": val, "digests": digests})

    def check_folders(self, endpoint_url: str | None = None) -> None:
        """Every dataset folder exists on this machine and every remote dataset can be listed (before a
        local run starts; `endpoint_url`: storage.endpoint_url)."""
        from workloads.staging import is_uri

        for key, folder in self.folders().items():
            if is_uri(folder):
                _remote(key, folder, endpoint_url)
            elif not Path(folder).is_dir():
                raise SpecError(f"{key}: {folder} is not a folder on this machine; fix the path "
                                "(`restorch data synth` writes a small dataset)")

    @model_validator(mode="after")
    def _one_schedule(self) -> DataSpec:
        fixed = self.patch_size is not None or self.batch_size is not None
        progressive = any(v is not None for v in (self.patch_sizes, self.batch_sizes, self.stage_iterations))
        if fixed and progressive:
            raise ValueError("give either patch_size + batch_size or patch_sizes + batch_sizes + stage_iterations, not both")
        if progressive and not all(v for v in (self.patch_sizes, self.batch_sizes, self.stage_iterations)):
            raise ValueError("a progressive schedule needs patch_sizes, batch_sizes and stage_iterations")
        if progressive and len({len(self.patch_sizes), len(self.batch_sizes), len(self.stage_iterations)}) != 1:
            raise ValueError("patch_sizes, batch_sizes and stage_iterations must have the same length")
        return self

    def schedule_config(self) -> dict[str, Any]:
        """The config of `workloads.data.PatchSchedule`."""
        if self.patch_sizes:
            return {"patch_sizes": self.patch_sizes, "batch_sizes": self.batch_sizes, "iterations": self.stage_iterations}
        return {"patch_size": self.patch_size or 64, "batch_size": self.batch_size or 4}


def _check_benchmark_set(name: str, entry: Mapping) -> None:
    """A named set {benchmark: NAME, path: folder} with a catalogued NAME (checked here, so that one message
    says what is wrong instead of the union's every branch)."""
    from workloads.benchmarks import get_benchmark

    if set(entry) != {"benchmark", "path"} or not all(isinstance(value, str) and value for value in entry.values()):
        raise ValueError(f"validation set {name!r}: a benchmark set is {{benchmark: NAME, path: folder}}, got {dict(entry)!r}")
    get_benchmark(entry["benchmark"])  # a ValueError listing the known benchmarks


def _remote(key: str, uri: str, endpoint_url: str | None) -> Any:
    """The listing of the remote dataset `key` (workloads.staging.RemoteDataset), or a SpecError."""
    from workloads.staging import DatasetUnavailable, list_remote

    try:
        return list_remote(uri, endpoint_url)
    except DatasetUnavailable as error:
        raise SpecError(f"{key}: {error}") from None


class TrainSpec(_Section):
    iterations: int = Field(200, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iterations: int = Field(0, ge=0)
    constant_iterations: int | None = Field(
        None, ge=0, description="iterations at constant lr before the cosine decay; default 92/300 of the run (Restormer)"
    )
    min_lr: float = Field(1e-6, ge=0)
    grad_clip: float = Field(0.01, gt=0, description="gradient norm clip (Restormer: 0.01)")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step, for a global batch larger "
                                                         "than the workers' memory (the step and lr stay per batch)")
    val_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 100
    max_failures: int = Field(1, ge=0, description="worker crashes to recover from (restart from the last checkpoint)")


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2] = 1
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs that support it, else fp32")


class ResourcesSpec(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial (data-parallel ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    trial_mode: Literal["auto", "inline", "job"] = Field(
        "auto", description="how a sweep trial trains: inline (in its Tune trial's own process: seconds to start, one "
                            "worker only), job (a Ray Train job: about 20 s more per trial on 2 cores), auto (inline "
                            "for one worker)")

    @model_validator(mode="after")
    def _inline_is_one_worker(self) -> ResourcesSpec:
        if self.trial_mode == "inline" and self.num_workers > 1:
            raise ValueError(f"resources.trial_mode: an inline trial trains in one process, but num_workers is "
                             f"{self.num_workers}; use trial_mode: job (or auto) for several workers")
        return self


class StorageSpec(_Section):
    path: str = Field(DEFAULT_STORAGE, description="local folder or s3://bucket/prefix for checkpoints and results")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto)")
    shared: bool = Field(False, description="the local folder `path` is mounted by every node of the cluster "
                                            "(NFS); without it a cluster job needs an s3:// path")


class TrackingSpec(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db "
                                              "(one machine only: on a cluster, an http(s) server: restorch tracking up)")
    experiment: str | None = Field(None, description="MLflow experiment name; default the spec's name")


class SearchSpec(_Section):
    algorithm: Literal["random", "grid", "optuna", "optuna_multi", "gp", "cmaes", "bohb"] = Field(
        "random", description="random (and grid entries), grid, optuna (TPE), optuna_multi (multi-objective TPE), "
                              "gp (Gaussian-process Bayesian optimisation), cmaes (CMA-ES, ranges only) or bohb "
                              "(BOHB: Bayesian optimisation with HyperBand, with scheduler bohb)"
    )
    scheduler: Literal["fifo", "asha", "hyperband", "median", "pbt", "bohb"] = Field(
        "fifo", description="fifo runs every trial to the end; asha stops weak ones at rungs; hyperband (synchronous, "
                            "with random or grid) pauses trials at rungs and continues the best; median stops a trial "
                            "whose best is worse than the median of the others' running averages; pbt (population "
                            "based training) continues weak trials from strong ones' checkpoints with mutated lr / "
                            "weight decay; bohb: HyperBand for algorithm bohb")
    metric: str = Field("psnr", description="validation metric that ranks trials and checkpoints (psnr, ssim, loss, ...)")
    mode: Literal["max", "min"] = "max"
    objectives: dict[str, Literal["max", "min"]] | None = Field(
        None, description="optuna_multi: metric -> mode, e.g. {psnr: max, conv_gmacs: min}"
    )
    num_samples: int = Field(1, ge=1, description="samples of the space (grid: repeats of the full grid)")
    max_concurrent_trials: int = Field(1, ge=1)
    max_trials: int = Field(DEFAULT_MAX_TRIALS, ge=1, description="refuse larger sweeps unless --yes")
    grace_period: int = Field(1, ge=1, description="asha, median: validations before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1, description="asha, hyperband, bohb: keep the best 1/reduction_factor "
                                                         "at each rung")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per trial (the best by the metric, and the latest)")
    time_budget_s: float | None = Field(None, gt=0, description="per-trial wall-time budget (the iteration budget is train.iterations)")
    perturbation_interval: int | None = Field(
        None, ge=1, description="pbt: iterations between perturbations, a multiple of train.val_every and "
                                "train.checkpoint_every; each interval is one Ray Train job run (about 20 s of start-up), "
                                "and pbt trials keep every checkpoint (other trials may continue from any)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: the bottom fraction of the trials that "
                                                                    "continue from the top fraction's checkpoints")
    resample_probability: float = Field(0.25, ge=0, le=1, description="pbt: chance that a mutated value is drawn anew "
                                        "instead of scaled by 0.8 or 1.2 (a list value: moved to a neighbour)")
    hyperparam_mutations: dict[str, Any] | None = Field(
        None, description="pbt: what it mutates, train.lr and/or train.weight_decay -> {loguniform: [lo, hi]}, "
                          "{uniform: [lo, hi]} or a list of values")
    synch: bool = Field(False, description="pbt: perturb all trials together at each interval (waits for the slowest)")
    warm_start: list[str] | None = Field(
        None, description="earlier sweeps (names or parent run ids) whose finished trials the searcher starts from: "
                          "their configurations are not run again (orchestrator/run/warm_start.py)")

    @field_validator("warm_start")
    @classmethod
    def _sources_named(cls, sources: list[str] | None) -> list[str] | None:
        if sources is not None and (not sources or not all(sources) or len(set(sources)) < len(sources)):
            raise ValueError(f"give one or more distinct sweep names or parent run ids, got {sources!r}")
        return sources

    @model_validator(mode="after")
    def _warm_startable(self) -> SearchSpec:
        if self.warm_start and self.scheduler == "pbt":
            raise ValueError("warm_start: pbt trials change their values while they train, so no earlier result "
                             "stands for one configuration; remove warm_start or use another scheduler")
        if self.warm_start and self.algorithm == "optuna_multi":
            raise ValueError("warm_start: Ray's OptunaSearch takes one reward per earlier trial, not one per objective; "
                             "remove warm_start or use a single-objective algorithm")
        return self


class AblationSetting(_Section):
    label: str = Field(min_length=1, description="the variant's name in the report, e.g. 'GLMHA r=0.75'")
    set: dict[str, Any] = Field(default_factory=dict,
                                description="dotted key under model, train or data -> value; a number picks a "
                                            "list item (model.attention.0: the first level)")

    @field_validator("set")
    @classmethod
    def _plain_assignments(cls, assignments: dict[str, Any]) -> dict[str, Any]:
        for key, value in assignments.items():
            if key.split(".")[0] not in SEARCHABLE_SECTIONS or "." not in key:
                raise ValueError(f"{key!r}: a setting changes a dotted key under {', '.join(SEARCHABLE_SECTIONS)}, "
                                 "e.g. model.glmha.kv_reduction")
            if extract_search_space("set", value)[1]:
                raise ValueError(f"{key}: a setting takes one value, not a search-space entry; list each value "
                                 "as a setting of its own")
        return assignments


class AblationSpec(_Section):
    """The `ablation:` section (orchestrator/spec/ablation.py makes the variants)."""

    mode: Literal["one_at_a_time", "factorial", "cumulative"] = Field(
        "one_at_a_time", description="one_at_a_time: each setting alone on the baseline; factorial: every combination "
                                     "of one setting per factor; cumulative: the settings added one by one, in order")
    baseline: AblationSetting = Field(AblationSetting(label="baseline"),
                                      description="the reference row: its set overrides the spec's model/train/data")
    factors: dict[str, list[AblationSetting]] = Field(min_length=1, description="factor name -> its settings")
    seeds: list[int] | None = Field(None, min_length=1, description="train every variant once per seed (mean ± std)")
    profile_only: bool = Field(False, description="fill the FLOPs/Params columns only: profile, train nothing")

    @field_validator("factors")
    @classmethod
    def _settings_given(cls, factors: dict[str, list[AblationSetting]]) -> dict[str, list[AblationSetting]]:
        empty = [name for name, settings in factors.items() if not settings]
        if empty:
            raise ValueError(f"factor {empty[0]!r} has no settings; give it a list of {{label, set}}")
        return factors


class Domain(BaseModel):
    """One search-space entry: a dotted key and its distribution; an entry of a value's sub-space (a
    conditional option) is searched only when the entry `parent` takes the value `when`."""

    key: str
    kind: Literal["choice", "grid", "uniform", "loguniform", "randint", "quniform"]
    values: list[Any]
    parent: str | None = None
    when: Any = None

    def candidates(self) -> list[Any]:
        """Values to validate the spec with: every listed value, or the range's ends."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1]) - 1]
        return [self.values[0], self.values[1]]


class ExperimentSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run/sweep name (letters, digits, _ . -)")
    model: dict[str, Any]
    task: TaskSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    resources: ResourcesSpec = ResourcesSpec()
    search: SearchSpec = SearchSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    ablation: AblationSpec | None = Field(None, description="an ablation study of the model/train/data (restorch ablate)")
    search_space: list[Domain] = Field(default_factory=list, description="filled by load_spec from the sections")

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _batches_split(self) -> ExperimentSpec:
        """Each global batch splits evenly over the workers and the micro-batches of a step."""
        schedule = self.data.schedule_config()
        key = "data.batch_sizes" if "batch_sizes" in schedule else "data.batch_size"
        workers, accumulation = self.resources.num_workers, self.train.grad_accumulation
        for batch in schedule.get("batch_sizes") or [schedule["batch_size"]]:
            if batch % (workers * accumulation):
                multiple = workers * accumulation * max(1, round(batch / (workers * accumulation)))
                raise ValueError(
                    f"{key}: {batch} is a global batch, split over resources.num_workers ({workers}) x "
                    f"train.grad_accumulation ({accumulation}) micro-batches; make it a multiple of "
                    f"{workers * accumulation} (e.g. {multiple}) or change num_workers / grad_accumulation")
        return self

    def trial_count(self) -> int:
        """Trials a sweep launches: the product of the grid sizes (an entry with sub-spaces: its branches,
        `grid_size`), times num_samples."""
        roots = [domain for domain in self.search_space if domain.parent is None]
        return grid_size(self.search_space, roots) * self.search.num_samples

    def inline_trials(self) -> bool:
        """Whether sweep trials train in their Tune trial's process (orchestrator/run/inline_trial.py) rather than in
        a Ray Train job: `inline`, or `auto` with one worker per trial."""
        if self.resources.trial_mode == "auto":
            return self.resources.num_workers == 1
        return self.resources.trial_mode == "inline"

    def objectives(self) -> dict[str, str]:
        """Metric -> max/min of what the search optimises (one metric, or the multi-objective set)."""
        return dict(self.search.objectives) if self.search.objectives else {self.search.metric: self.search.mode}

    def searched_keys(self) -> list[str]:
        """The dotted keys whose values differ between trials: the search space's, then those only pbt mutates."""
        space = [d.key for d in self.search_space]
        return space + [key for key in self.search.hyperparam_mutations or {} if key not in space]

    def config(self) -> dict[str, Any]:
        """The spec as plain data (what travels to the workers)."""
        return self.model_dump(mode="json", exclude={"search_space"})

    def as_written(self) -> dict[str, Any]:
        """The spec as plain data with the search-space entries in place (defaults filled in); an
        ablation's search space is made from its ablation section, so it is not written back."""
        config = self.config()
        space = [] if self.ablation else self.search_space
        for domain in space:
            if domain.parent is None:
                set_dotted(config, domain.key, written(space, domain))
        return config


# ------------------------------------------------------------------------------------------------
# search-space entries

def _is_domain(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in DOMAIN_KINDS


def _check_domain(key: str, kind: str, values: Any) -> Domain:
    if not isinstance(values, list) or not values:
        raise SpecError(f"{key}: {{{kind}: ...}} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint", "quniform"):
        size = 3 if kind == "quniform" else 2
        if len(values) != size or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            shape = "[lo, hi, q]" if kind == "quniform" else "[lo, hi]"
            raise SpecError(f"{key}: {kind} takes {shape} numbers, got {values!r}")
        lo, hi = values[0], values[1]
        if lo > hi or (kind == "randint" and lo == hi):
            raise SpecError(f"{key}: {kind} range has lo {lo} > hi {hi}; write [lo, hi] with lo < hi")
        if kind == "loguniform" and lo <= 0:
            raise SpecError(f"{key}: loguniform needs lo > 0 (got {lo}); use uniform for ranges that include 0")
        if kind == "quniform" and values[2] <= 0:
            raise SpecError(f"{key}: quniform step q must be > 0, got {values[2]}")
    return Domain(key=key, kind=kind, values=values)


def _is_branch(value: Any) -> bool:
    """A choice or grid value with a sub-space: {value: V, with: {key: entry, ...}}."""
    return isinstance(value, Mapping) and set(value) == {"value", "with"}


def _branches(section: str, key: str, kind: str, values: list[Any]) -> tuple[list[Any], list[Domain]]:
    """A choice's or grid's plain values, and the entries of their sub-spaces (keys relative to `section`)."""
    plain, domains = [], []
    for item in values:
        if not _is_branch(item):
            plain.append(item)
            continue
        value, sub = item["value"], item["with"]
        if kind not in ("choice", "grid"):
            raise SpecError(f"{key}: only a choice or grid value may carry a sub-space (`with`), not a {kind}")
        if not isinstance(sub, Mapping) or not sub:
            raise SpecError(f"{key}: value {value!r}: `with` takes a mapping of search-space entries, e.g. "
                            "{glmha.alpha: {uniform: [0.2, 1.0]}}")
        for name in sub:
            if str(name).split(".")[0] == section:
                raise SpecError(f"{key}: value {value!r}: the keys in `with` are relative to the section {section}; "
                                f"write {str(name).split('.', 1)[-1]}, not {name}")
        fixed = next(_plain_leaves(sub, section), None)
        if fixed is not None:
            raise SpecError(f"{fixed}: a sub-space (`with` of {key}: {value!r}) takes search-space entries; "
                            "write a single value as {choice: [VALUE]}")
        _, found = extract_search_space(section, dict(sub), section)
        plain.append(value)
        domains += [d.model_copy(update={"parent": key, "when": value}) if d.parent is None else d for d in found]
    return plain, domains


def _plain_leaves(tree: Mapping, prefix: str) -> Iterator[str]:
    """The dotted keys of the values under `tree` that are not search-space entries."""
    for name, value in tree.items():
        if isinstance(value, Mapping) and value and not _is_domain(value):
            yield from _plain_leaves(value, f"{prefix}.{name}")
        elif not _is_domain(value):
            yield f"{prefix}.{name}"


def extract_search_space(section: str, tree: Any, prefix: str = "") -> tuple[Any, list[Domain]]:
    """Replace every search-space entry under `tree` by its first candidate; return them as Domains (an
    entry's sub-space entries right after it)."""
    if _is_domain(tree):
        kind, values = next(iter(tree.items()))
        if isinstance(values, list):
            values, conditional = _branches(section, prefix, kind, values)
        else:
            conditional = []
        domain = _check_domain(prefix, kind, values)
        return domain.candidates()[0], [domain, *conditional]
    if isinstance(tree, Mapping):
        plain: dict[str, Any] = {}
        domains: list[Domain] = []
        for key, value in tree.items():
            plain[key], found = extract_search_space(section, value, f"{prefix}.{key}" if prefix else f"{section}.{key}")
            domains += found
        return plain, domains
    return tree, []


def sub_space(space: list[Domain], domain: Domain, value: Any) -> list[Domain]:
    """The entries that `domain` taking `value` switches on."""
    return [d for d in space if d.parent == domain.key and d.when == value]


def enumerated(space: list[Domain], domain: Domain) -> bool:
    """Whether the entry's trials are enumerated (a grid, or an entry with a grid in a sub-space: a grid
    cannot be sampled) rather than sampled."""
    return domain.kind == "grid" or any(enumerated(space, d) for d in space if d.parent == domain.key)


def grid_size(space: list[Domain], entries: list[Domain]) -> int:
    """The grid points of `entries` (of `space`): the product of the grid sizes, an enumerated entry with
    sub-spaces counting each value once per grid point of its sub-space (csa, glmha x 2 kv_reduction: 3)."""
    def points(domain: Domain) -> int:
        if not enumerated(space, domain):
            return 1
        return sum(grid_size(space, sub_space(space, domain, value)) for value in domain.values)

    return math.prod(points(domain) for domain in entries)


def written(space: list[Domain], domain: Domain) -> dict[str, list[Any]]:
    """The entry as a spec writes it, its values' sub-spaces in place (keys relative to the section)."""
    section = domain.key.split(".")[0]
    values = []
    for value in domain.values:
        sub = sub_space(space, domain, value)
        values.append({"value": value, "with": {d.key.removeprefix(f"{section}."): written(space, d) for d in sub}}
                      if sub else value)
    return {domain.kind: values}


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """config['model']['glmha']['alpha'] = value for key 'model.glmha.alpha'; a number picks a list
    item (key 'model.attention.0': the first item of model.attention)."""
    *parents, leaf = key.split(".")
    node: Any = config
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[_list_index(node, part, key)]
    if isinstance(node, dict):
        node[leaf] = value
    else:
        node[_list_index(node, leaf, key)] = value


def _list_index(node: Any, part: str, key: str) -> int:
    if not isinstance(node, list) or not part.isdigit() or int(part) >= len(node):
        raise SpecError(f"{key}: {part!r} is neither a key nor a list index of {node!r}")
    return int(part)


def assign(base: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with each value set at its dotted key (the values copied too: one set here must
    not alias another)."""
    config = copy.deepcopy(base)
    for key, value in copy.deepcopy(dict(values)).items():
        set_dotted(config, key, value)
    return config


def mutation_domains(search: SearchSpec) -> list[Domain]:
    """pbt's `search.hyperparam_mutations` as Domains (a list of values is a `choice`)."""
    domains = []
    for key, entry in (search.hyperparam_mutations or {}).items():
        where = f"search.hyperparam_mutations.{key}"
        if key not in PBT_MUTABLE:
            raise SpecError(f"{where}: pbt mutates {' and '.join(PBT_MUTABLE)} only (what a running trial can change); "
                            "remove it, and search it with an entry in place instead")
        entry = {"choice": entry} if isinstance(entry, list) else entry
        if not _is_domain(entry) or next(iter(entry)) not in ("choice", "uniform", "loguniform"):
            raise SpecError(f"{where}: give a list of values, {{uniform: [lo, hi]}} or {{loguniform: [lo, hi]}}; "
                            f"got {entry!r}")
        (kind, values), = entry.items()
        domains.append(Domain(key=key, kind=kind, values=_check_domain(where, kind, values).values))
    return domains


def candidate_assignments(space: list[Domain]) -> Iterator[dict[str, Any]]:
    """Each distinct candidate value of each domain alone, a conditional option's with the values that switch
    it on before it (enough to validate every value against the schema)."""
    by_key = {domain.key: domain for domain in space}
    for domain in space:
        switch: dict[str, Any] = {}
        parent = domain
        while parent.parent is not None:
            switch = {parent.parent: parent.when, **switch}
            parent = by_key[parent.parent]
        seen = set()
        for value in domain.candidates():
            if repr(value) not in seen:
                seen.add(repr(value))
                yield {**switch, domain.key: value}


def json_schema() -> dict[str, Any]:
    schema = ExperimentSpec.model_json_schema()
    schema["properties"].pop("search_space", None)
    schema["description"] = (
        "restorch experiment spec. Any value under model, train or data may be a search-space entry: "
        + ", ".join(f"{{{kind}: [...]}}" for kind in DOMAIN_KINDS)
    )
    return schema
