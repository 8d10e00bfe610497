"""`restorch sweep`: a Ray Tune search in which every trial trains one job: inline, in the trial's own process
(one worker: orchestrator/run/inline_trial.py), or as a Ray Train job (`resources.trial_mode`).

The sweep driver (`run_sweep`) validates everything, starts or joins Ray, opens the sweep's MLflow
parent run and runs a Tuner (or restores it, when a sweep of the same name is in storage) over
`run_trial`, a Tune function trainable. Each trial:
1. resolves its config (the spec with the sampled values at their dotted keys);
2. finds or creates its MLflow child run (orchestrator/tracking/runs.py);
3. trains its job, named after the trial id, so that a re-run of the trial (after an error, or when the
   sweep is resumed) resumes the job from its last checkpoint in `jobs/{trial id}/`: inline (`fit_job`:
   the training recipe in this process, retried by Tune's FailureConfig) or as its own TorchTrainer
   (orchestrator/run/jobs.py; Ray Train V2 resumes a run of the same name and storage, and retries it);
4. forwards the job's validation reports to Tune (`TrialReportCallback`), which carry the model's size
   metrics (rank 0 computes them: orchestrator/run/trial_job.py); the last one once the job has ended.
A job trial's actor never imports the training recipe or DeepSpeed (the job's workers do): on a 2-core
machine every process start and import is paid in the trials' start-up (README, "Where the time goes").
An inline trial skips the job's controller and worker processes altogether.
Tune must not reuse trial actors: a trial that ASHA stops is inside its job's `fit`, and a reused actor
would start the next trial while that job still runs (both report under one trial id).

Population based training (`search.scheduler: pbt`, `run_pbt_trial`): under Ray Train V2 a trial's
job hands Tune no checkpoint, and PBT only copies trials that have one. So a pbt trial fits its job
perturbation_interval iterations at a time (the job config's `segment`) and after each fit reports to
Tune itself, with a Tune checkpoint that is a small file naming the job's last checkpoint. When PBT
copies a strong trial into a weak one, the weak trial restarts with mutated lr / weight decay and the
strong trial's file, and starts a new job (`{trial id}-g{n}`) from the strong trial's job checkpoint
(the segment's `init_from`). Its jobs keep every checkpoint, since other trials may continue from any
of them.

Layout in storage: `{storage}/{name}/` is Tune's experiment folder, plus `spec.yaml` (the spec the
sweep was started with), `jobs/{trial id}/checkpoint_*` (each trial's job; pbt trials may add
`jobs/{trial id}-g{n}`), `reports/{trial id}/` (each validation report Tune got, from which a resume
rebuilds the scheduler: orchestrator/run/sweep_resume.py), `sweep.lock` (one driver at a time:
orchestrator/run/sweep_lock.py) and, at the end, `results.csv` and `best_spec.yaml` (the best trial as a
spec for `restorch train`).

Resources: a job trial's Tune function reserves no CPU, only one `trial_slot`, a custom resource the
embedded Ray is started with (max_concurrent_trials of them); the trial's workers take the CPUs/GPUs. A
cluster joined with `--address` must define `trial_slot` itself (on its head, say). An inline trial reserves
its one worker's CPUs/GPU and no `trial_slot`, so that it trains on any node; the searcher's limit keeps it
to max_concurrent_trials (a hyperband sweep's generator has none: there the CPUs/GPUs do).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import yaml
from ray import tune

from workloads.storage import STORAGE_ERRNOS
from orchestrator.run.jobs import (check_cluster_resources, init_ray, job_config, make_trainer, pin_paths, preflight,
                                   worker_resources)
from orchestrator.console import console
from orchestrator.run.schedulers import HyperBand, HyperBandBOHB, MedianStopping
from orchestrator.run.progress import SweepProgress
from orchestrator.run.search_space import optuna_space, tune_domain, tune_param_space
from orchestrator.report.results import Row, format_table, pareto_front, result_columns, to_csv, trial_rows
from orchestrator.spec.schema import Domain, ExperimentSpec, SpecError
from orchestrator.spec.load import check_trial_limit, load_spec_text
from orchestrator.spec.schema import MEDIAN_MIN_OTHERS, mutation_domains
from orchestrator.spec.trial import resolve_trial
from workloads.storage import filesystem, read_text, write_text
from orchestrator.run.sweep_lock import sweep_lock
from orchestrator.run.sweep_resume import (REBUILT_SCHEDULERS, check_resumable, rebuild, reports_to_replay, stored_reports)
from orchestrator.run.timeline import mark
from orchestrator.tracking.runs import (TrialStatusCallback, close_sweep_run, log_pbt_job, open_sweep_run, open_trial_run)
from orchestrator.tracking.store import open_store, resolve_uri
from orchestrator.run.trial_reports import TrialReportCallback, scored_for_tune
from orchestrator.run.warm_start import (WarmStart, WarmTuneBOHB, load_warm_start, optuna_arguments, tag_sources,
                                        variant_generator)
from workloads.job_config import JobConfig, PbtSegment, TrackedRun

TRIAL_RESOURCE = "trial_slot"
SPEC_FILE, RESULTS_FILE, BEST_SPEC_FILE = "spec.yaml", "results.csv", "best_spec.yaml"
JOBS_DIR = "jobs"
LOG_FILE = "sweep.log"  # what the driver's process writes besides restorch's lines (orchestrator/console.py)
POINTER_FILE = "train_checkpoint.json"  # a pbt trial's Tune checkpoint: which job checkpoint it stands for


@dataclass
class SweepOutcome:
    spec: ExperimentSpec
    path: str  # the sweep's folder in storage
    rows: list[Row]  # one per trial, best first
    columns: list[str]
    pareto: list[Row]  # optuna_multi only
    errors: int
    parent_run_id: str  # the sweep's MLflow parent run

    def report(self) -> str:
        """The results table, the best trial and (multi-objective) the Pareto set, as text."""
        lines = [f"sweep {self.spec.name}: {len(self.rows)} trials, sorted by {self.spec.search.metric} "
                 f"({self.spec.search.mode})", format_table(self.rows, self.columns)]
        if self.pareto:
            objectives = self.spec.search.objectives or {}
            lines += [f"\nPareto set over {', '.join(f'{k} ({v})' for k, v in objectives.items())}:",
                      format_table(self.pareto, ["trial", *self.spec.searched_keys(), *objectives])]
        if self.rows and self.rows[0].get(self.spec.search.metric) is not None:
            best = self.rows[0]
            values = ", ".join(f"{key}={best[key]}" for key in self.spec.searched_keys()
                               if best.get(key) is not None)  # None: a conditional option the trial did not take
            lines.append(f"\nbest trial {best['trial']}: {values} ({self.spec.search.metric} "
                         f"{best[self.spec.search.metric]:.4f}); its full spec: {self.path}/{BEST_SPEC_FILE}")
        lines.append(f"results: {self.path}/{RESULTS_FILE}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the trial (runs in a Tune trial actor)


def _plain(value: Any) -> Any:
    """Tune/optuna samples may be numpy scalars; the spec and YAML want Python ones."""
    return value.item() if hasattr(value, "item") else value


def run_trial(searched: dict[str, Any], *, base: dict[str, Any], tracking: dict[str, str], folder: str,
              validation_metric: str, stopped: dict[str, dict[str, Any]], space: list[Domain] | None = None) -> None:
    """Tune function trainable: one trial = one Ray Train job with the trial's values. `stopped`: the
    trials the scheduler had stopped before a resume, with their last report (orchestrator/run/sweep_resume.py)."""
    mark("trial_started")
    context = tune.get_context()
    trial_id = context.get_trial_id()
    if trial_id in stopped:  # stopped where the interrupted sweep stopped it: report that, run nothing
        tune.report({**stopped[trial_id], "done": True})
        return
    spec = ExperimentSpec.model_validate(resolve_trial(base, {key: _plain(v) for key, v in searched.items()}, space))
    run_id, finished = open_trial_run(tracking, trial_id, context.get_trial_name())
    if finished is not None:  # ended before an interrupted sweep could record it: report, don't re-run
        tune.report({**finished, "done": True})  # done: no scheduler acts on it (pbt would restart it)
        return
    config = job_config(spec, trial_id, f"{folder}/{JOBS_DIR}", tracking=TrackedRun(tracking["uri"], run_id))
    if spec.search.scheduler == "pbt":
        run_pbt_trial(spec, config, {key: _plain(v) for key, v in searched.items()}, trial_id=trial_id, tracking=tracking)
        return
    callback = TrialReportCallback(validation_metric, spec.objectives(), trial_id=trial_id,
                                   sweep=filesystem(folder, spec.storage.endpoint_url),
                                   last_iteration=spec.train.iterations)
    mark("trial_job_submitted")
    metrics, _ = fit_job(spec, config, callback)
    callback.report_last(metrics)


def fit_job(spec: ExperimentSpec, config: JobConfig, callback: TrialReportCallback | None = None, *,
            keep_all_checkpoints: bool = False) -> tuple[dict[str, Any], str]:
    """Train the trial's job (inline, or as a Ray Train job: `spec.inline_trials()`), its validation reports sent to
    Tune through `callback` (all but the last: TrialReportCallback.report_last); returns its last report and the
    path of its last checkpoint."""
    if spec.inline_trials():
        from orchestrator.run.inline_trial import run_inline

        return run_inline(config, use_gpu=spec.resources.use_gpu, metric=spec.search.metric, mode=spec.search.mode,
                          keep=None if keep_all_checkpoints else spec.search.keep_checkpoints,
                          for_tune=callback and callback.for_tune)
    result = make_trainer(spec, config, callbacks=[callback] if callback else None,
                          keep_all_checkpoints=keep_all_checkpoints).fit()
    return result.metrics, result.checkpoint.path


def run_pbt_trial(spec: ExperimentSpec, config: JobConfig, searched: dict[str, Any], *, trial_id: str,
                  tracking: dict[str, str]) -> None:
    """A pbt trial: its job runs search.perturbation_interval iterations at a time (one fit each, resumed
    from the job's last checkpoint) and after each the trial reports to Tune with a small checkpoint
    naming that job checkpoint: what PBT hands from a strong trial to a weak one. Restarted with another
    trial's such checkpoint (an exploitation, with `searched` mutated), the trial starts a new job from
    that job checkpoint, with its own lr and weight decay."""
    pointer = _read_pointer(tune.get_checkpoint()) or {"trial_id": trial_id, "job": trial_id, "iteration": 0}
    done, donor = pointer["iteration"], pointer["trial_id"]
    storage, init_from = replace(config.storage, job=pointer["job"]), None
    if donor != trial_id:
        storage_fs, jobs = filesystem(storage.path, spec.storage.endpoint_url)
        storage = replace(storage, job=_new_job_name(storage_fs, jobs, trial_id))
        init_from = ray.train.Checkpoint(pointer["path"], filesystem=storage_fs)
    if donor != trial_id or done == 0:
        log_pbt_job(tracking, config.tracking.run_id, job=storage.job, iteration=done, values=searched,
                    donor=None if donor == trial_id else donor)
    total = spec.train.iterations
    while done < total:
        done = min(done + spec.search.perturbation_interval, total)
        config = replace(config, storage=storage, segment=PbtSegment(stop_at=done, init_from=init_from))
        metrics, checkpoint = fit_job(spec, config, keep_all_checkpoints=True)
        pointer = {"trial_id": trial_id, "job": storage.job, "iteration": done, "path": checkpoint}
        with tempfile.TemporaryDirectory(prefix="restorch-pbt-") as folder:
            (Path(folder) / POINTER_FILE).write_text(json.dumps(pointer))
            tune.report(scored_for_tune({**metrics, "done": done >= total},
                                        spec.objectives()),
                        checkpoint=tune.Checkpoint.from_directory(folder))


def _new_job_name(storage_fs: pyarrow.fs.FileSystem, jobs: str, trial_id: str) -> str:
    """`{trial_id}-g{n}`, n past the trial's jobs in storage: each exploitation starts a job of its own
    (a job of an existing name would resume that job's checkpoint, not the donor's)."""
    found = storage_fs.get_file_info(pyarrow.fs.FileSelector(jobs, allow_not_found=True))
    taken = [int(match[1]) for info in found if (match := re.fullmatch(rf"{re.escape(trial_id)}-g(\d+)", info.base_name))]
    return f"{trial_id}-g{max(taken, default=0) + 1}"


def _read_pointer(checkpoint: tune.Checkpoint | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / POINTER_FILE).read_text())


# ------------------------------------------------------------------------------------------------
# the sweep driver


OPTUNA_SAMPLERS = {"optuna": "TPESampler", "optuna_multi": "TPESampler", "gp": "GPSampler", "cmaes": "CmaEsSampler"}


def _search_algorithm(spec: ExperimentSpec, warm: WarmStart | None = None) -> Any:
    """The searcher, limited to max_concurrent_trials trials at once, given the earlier trials of a warm start."""
    search = spec.search
    if search.algorithm in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # hyperband pauses trials until their bracket fills; the generator would count paused trials as running
        # and never fill it: the trial_slot resources bound what runs at once instead
        limit = 0 if search.scheduler == "hyperband" else search.max_concurrent_trials
        if warm is not None:
            return variant_generator(warm, spec, limit)
        return BasicVariantGenerator(random_state=spec.train.seed, max_concurrent=limit)
    if search.algorithm == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        # its own limit leaves out the trials HyperBandForBOHB paused (ConcurrencyLimiter would count them)
        bohb = TuneBOHB if warm is None else partial(WarmTuneBOHB, warm)
        return bohb(metric=search.metric, mode=search.mode, seed=spec.train.seed,
                    max_concurrent=search.max_concurrent_trials)
    import optuna.samplers
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler = getattr(optuna.samplers, OPTUNA_SAMPLERS[search.algorithm])(seed=spec.train.seed)
    if search.algorithm == "optuna_multi":
        objectives = spec.objectives()
        searcher = OptunaSearch(optuna_space(spec), metric=list(objectives), mode=list(objectives.values()),
                                sampler=sampler)
    else:
        searcher = OptunaSearch(optuna_space(spec), metric=search.metric, mode=search.mode, sampler=sampler,
                                **optuna_arguments(warm))
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent_trials)


def _scheduler(spec: ExperimentSpec) -> Any:
    """The scheduler, given the metric it ranks by itself (not through TuneConfig): a resumed sweep's scheduler
    is rebuilt from the stored reports before Tune gets it (orchestrator/run/sweep_resume.py)."""
    from ray.tune import schedulers

    search, train = spec.search, spec.train
    if search.scheduler == "fifo":
        return schedulers.FIFOScheduler()
    ranking = {"time_attr": "iteration", "metric": search.metric, "mode": search.mode}
    if search.scheduler == "pbt":  # a list of values: PBT moves to a neighbouring value, a range: scales or redraws
        mutations = {d.key: d.values if d.kind == "choice" else tune_domain(d) for d in mutation_domains(search)}
        return schedulers.PopulationBasedTraining(**ranking, perturbation_interval=search.perturbation_interval,
                                                  hyperparam_mutations=mutations,
                                                  quantile_fraction=search.quantile_fraction,
                                                  resample_probability=search.resample_probability, synch=search.synch)
    if search.scheduler == "median":
        return MedianStopping(**ranking, grace_period=search.grace_period * train.val_every,
                              min_samples_required=MEDIAN_MIN_OTHERS)
    if search.scheduler in ("hyperband", "bohb"):  # a paused trial restarts, its job from its last checkpoint
        hyperband = HyperBandBOHB if search.scheduler == "bohb" else HyperBand
        return hyperband(**ranking, max_t=train.iterations, reduction_factor=search.reduction_factor)
    return schedulers.ASHAScheduler(**ranking, max_t=train.iterations, grace_period=search.grace_period * train.val_every,
                                    reduction_factor=search.reduction_factor)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def read_stored_spec(folder: str, endpoint_url: str | None = None) -> ExperimentSpec | None:
    """The spec a sweep in storage was started with, or None if there is none."""
    text = read_text(folder, SPEC_FILE, endpoint_url)
    return None if text is None else load_spec_text(text, f"{folder}/{SPEC_FILE}")


def _trainable(spec: ExperimentSpec, tracking: dict[str, str], folder: str, validation_metric: str,
               stopped: dict[str, dict[str, Any]]) -> Any:
    trainable = tune.with_parameters(run_trial, base=spec.config(), tracking=tracking, folder=folder,
                                     validation_metric=validation_metric, stopped=stopped, space=spec.search_space)
    if spec.inline_trials():  # it trains in its own process, on any node: it reserves its worker's CPUs/GPU
        resources = worker_resources(spec)
        return tune.with_resources(trainable, {"cpu": resources["CPU"], "gpu": resources.get("GPU", 0)})
    return tune.with_resources(trainable, {"cpu": 0, TRIAL_RESOURCE: 1})  # its job's workers reserve the CPUs/GPUs


def _new_tuner(spec: ExperimentSpec, trainable: Any, tracking: dict[str, str], task_metrics: list[str],
               warm: WarmStart | None = None) -> Any:
    search = spec.search
    tune_config = tune.TuneConfig(  # no metric here: the searcher and the scheduler are given theirs
        search_alg=_search_algorithm(spec, warm), scheduler=_scheduler(spec), num_samples=search.num_samples,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
    )
    storage_filesystem, storage_path = filesystem(spec.storage.path, spec.storage.endpoint_url)
    run_config = tune.RunConfig(
        name=spec.name, storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=0,
        stop={"time_total_s": search.time_budget_s} if search.time_budget_s else None,
        # a job trial's retries are its Ray Train job's (make_trainer); an inline trial's are Tune's
        failure_config=tune.FailureConfig(max_failures=spec.train.max_failures) if spec.inline_trials() else None,
        callbacks=[TrialStatusCallback(tracking, spec.search.scheduler),
                   SweepProgress(spec.searched_keys(), task_metrics,
                                 trials=spec.trial_count() - (warm.skipped if warm else 0),
                                 iterations=spec.train.iterations)],
    )
    return tune.Tuner(trainable, param_space=tune_param_space(spec), tune_config=tune_config, run_config=run_config)


def _pinned(spec: ExperimentSpec) -> ExperimentSpec:
    """Paths and the tracking URI made absolute: the sweep means the same from any working directory."""
    spec = pin_paths(spec)
    tracking = spec.tracking.model_copy(update={"uri": resolve_uri(spec.tracking.uri)})
    return spec.model_copy(update={"tracking": tracking})


def _log_path(spec: ExperimentSpec, folder: str) -> Path:
    """The sweep's log: in its folder, or for a sweep stored on S3 in the temp folder of this machine."""
    if "://" in folder:
        return Path(tempfile.gettempdir()) / "restorch" / spec.name / LOG_FILE
    return Path(folder) / LOG_FILE


def _check_trial_slots() -> None:
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < 1:
        raise SpecError(f"the Ray cluster has no {TRIAL_RESOURCE!r} resource, which sweep trials reserve instead of "
                        f"CPUs; start its head with `ray start --head --resources '{{\"{TRIAL_RESOURCE}\": N}}'` "
                        "(N = trials at once)")


def run_sweep(spec: ExperimentSpec, *, address: str | None = None, yes: bool = False) -> SweepOutcome:
    """Run the sweep, or resume it when a sweep of the same name is in storage; one driver at a time
    (orchestrator/run/sweep_lock.py). A full or failing storage is reported as such (OSError with its errno)."""
    check_trial_limit(spec, yes=yes)
    preflight(spec, address, tracked=True)
    spec = _pinned(spec)
    folder = f"{spec.storage.path}/{spec.name}"
    with _storage_errors(folder), sweep_lock(folder, spec.storage.endpoint_url):
        return _drive(spec, folder, address)


def _drive(spec: ExperimentSpec, folder: str, address: str | None) -> SweepOutcome:
    from workloads.tasks import get_task

    stored = read_stored_spec(folder, spec.storage.endpoint_url)
    if stored is not None and stored.as_written() != spec.as_written():
        raise SpecError(f"name: a different sweep named {spec.name!r} is in {folder}; rename this one, "
                        f"or resume that one with `restorch sweep --resume {spec.name}`")
    task_metrics = list(get_task(spec.task.name, sigma=spec.task.sigma).protocol.metrics)
    warm = load_warm_start(spec)

    mark("driver_validated")
    console.print(f"sweep {spec.name}: {spec.trial_count()} trials ({spec.search.algorithm} search, "
                  f"{spec.search.scheduler} scheduler), {spec.search.max_concurrent_trials} at a time")
    console.capture(_log_path(spec, folder))
    with ThreadPoolExecutor(max_workers=1) as pool:
        store = pool.submit(open_store, spec.tracking.uri)
        init_ray(address, local_resources={TRIAL_RESOURCE: spec.search.max_concurrent_trials})
        store.result()
    mark("driver_ray_ready")
    check_cluster_resources(spec)
    if not spec.inline_trials():
        _check_trial_slots()
    storage_filesystem, storage_path = filesystem(folder, spec.storage.endpoint_url)
    resume = tune.Tuner.can_restore(storage_path, storage_filesystem=storage_filesystem)
    stopped, scheduler = _resumed_scheduler(spec, folder) if resume else ({}, None)
    tracking = open_sweep_run(spec, folder, resume=resume)
    if warm is not None:
        tag_sources(warm, tracking)
    try:
        trainable = _trainable(spec, tracking, folder, task_metrics[0], stopped)
        if resume:
            console.print(f"resuming sweep {spec.name} from {folder}")
            tuner = tune.Tuner.restore(storage_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=storage_filesystem)
            if scheduler is not None:  # Tuner.restore takes none: it would go on with the one pickled at the start
                tuner._local_tuner._tune_config.scheduler = scheduler
        else:
            write_text(folder, SPEC_FILE, yaml.safe_dump(spec.as_written(), sort_keys=False), spec.storage.endpoint_url)
            tuner = _new_tuner(spec, trainable, tracking, task_metrics, warm)
        mark("driver_tuner_started")
        grid = tuner.fit()
        failure = next((cause for error in grid.errors if (cause := _storage_cause(error))), None)
        if failure is not None:
            raise failure

        rows = trial_rows(grid, spec, task_metrics)
        expected = spec.trial_count() - (warm.skipped if warm else 0)  # an earlier sweep ran the skipped ones
        missing = 0 if spec.search.time_budget_s else max(0, expected - len(rows))
        if missing > 0:
            console.print(f"sweep {spec.name}: {missing} of its {spec.trial_count()} trials are not in Tune's state "
                          f"in {folder} (lost while it was written?); counted as errors")
        columns = result_columns(spec, task_metrics)
        pareto = pareto_front(rows, spec.search.objectives) if spec.search.algorithm == "optuna_multi" else []
        outcome = SweepOutcome(spec, folder, rows, columns, pareto,
                               errors=sum(row["status"] == "error" for row in rows) + missing,
                               parent_run_id=tracking["parent_run_id"])
        _finish(outcome, tracking)
    except BaseException:
        _close_failed(tracking)
        raise
    return outcome


def _resumed_scheduler(spec: ExperimentSpec, folder: str) -> tuple[dict[str, dict[str, Any]], Any]:
    """For a resume: the trials the interrupted sweep's scheduler stopped (id -> last report) and a scheduler
    rebuilt to the state it had (None: keep Tune's); refuses what cannot be resumed as it was."""
    from ray.tune import ExperimentAnalysis

    fs, path = filesystem(folder, spec.storage.endpoint_url)
    try:
        trials = ExperimentAnalysis(path, storage_filesystem=fs).trials
    except Exception as err:
        raise SpecError(f"the saved Tune state of sweep {spec.name} in {folder} cannot be read ({type(err).__name__}: "
                        f"{err}); move the folder aside and run the sweep again") from err
    started = bool(fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{JOBS_DIR}", allow_not_found=True)))
    check_resumable(spec, folder, trials, started=started)
    if spec.search.scheduler not in REBUILT_SCHEDULERS:
        return {}, None
    reports = reports_to_replay(spec, stored_reports(fs, path), {trial.trial_id for trial in trials})
    scheduler = _scheduler(spec)
    return rebuild(scheduler, reports, spec.train.iterations), scheduler


def _close_failed(tracking: dict[str, str]) -> None:
    """The parent run ends FAILED when the driver fails (its original error is what the user sees)."""
    try:
        close_sweep_run(tracking, failed=True, files={}, best={})
    except Exception as err:  # noqa: BLE001 - the driver's own error matters more
        console.print(f"MLflow: the sweep's parent run {tracking['parent_run_id']} could not be closed FAILED: {err}")


def _storage_cause(error: BaseException) -> OSError | None:
    """A full or failing disk behind `error` (its chain, Ray's wrapped causes, or a worker's message), as an
    OSError with that errno; None if there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        if os.strerror(errno.ENOSPC) in str(error):  # a worker's error, as text
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    return None


@contextmanager
def _storage_errors(folder: str) -> Iterator[None]:
    """A full or failing storage is raised as an OSError naming its errno (ENOSPC ...) and the sweep's folder,
    not as whatever it broke next (a truncated pickle read back, a Ray error)."""
    try:
        yield
    except Exception as err:
        cause = _storage_cause(err)
        if cause is None:
            raise
        name = errno.errorcode.get(cause.errno, "?")
        free = "" if "://" in folder else f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there now)"
        raise OSError(cause.errno, f"{os.strerror(cause.errno)} ({name}) while running the sweep stored in {folder}"
                                   f"{free}; free space (or fix the disk), then run the same command to resume") from err


def _finish(outcome: SweepOutcome, tracking: dict[str, str]) -> None:
    """results.csv and best_spec.yaml into storage and onto the parent run, which ends here."""
    spec, best = outcome.spec, outcome.rows[0] if outcome.rows else {}
    files = {RESULTS_FILE: to_csv(outcome.rows, outcome.columns)}
    if best.get(spec.search.metric) is not None:
        best_spec = resolve_trial(spec.config(), {key: best[key] for key in spec.searched_keys()}, spec.search_space)
        best_spec["name"] = f"{spec.name}-best"
        if spec.search.scheduler == "pbt":  # one run, with the best trial's last values
            best_spec["search"].update(scheduler="fifo", perturbation_interval=None, hyperparam_mutations=None)
        files[BEST_SPEC_FILE] = yaml.safe_dump(best_spec, sort_keys=False)
    for name, text in files.items():
        write_text(outcome.path, name, text, spec.storage.endpoint_url)
    close_sweep_run(tracking, failed=outcome.errors > 0, files=files, best=best)
