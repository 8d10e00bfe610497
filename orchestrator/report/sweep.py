"""Sweep reports, built from MLflow alone (`restorch report SWEEP`): the data.

Everything comes from the tracking store, so a report can be rebuilt on any machine pointed at it:
- the sweep's parent run (by run id, or the newest parent run of a sweep with that name) holds the
  spec it ran (`spec.yaml`): its search space, ranking metric (search.metric, search.mode) and objectives;
- its child runs, one per trial (TRIAL_TAG), hold what each trial ran (its params: the flattened job
  config, the searched keys among them; a key pbt mutates: its last metric value) and its final metrics.

`build_sweep_report` makes:
- rows, one per trial, best first: trial, status (FINISHED, FAILED, `stopped at N (asha)`: `run_state`),
  the searched values (empty where the trial did not run with the key), iteration, loss, the task's
  metrics, any other objective, params_m, conv_gmacs, wall_s (the run's wall time) and its cost on the machine from
  MLflow's system metrics (tracking/system_metrics.run_costs: mean CPU %, peak memory MB; the same of the GPUs);
- factors: the searched keys that took two or more values, the seed (train.seed) left out: trials
  that differ only in their seed are repeats;
- importance (importance.py) of the searched keys for search.metric, over the finished trials
  (FINISHED, not stopped early by a scheduler: a stopped trial's metric is from fewer iterations);
- two_way: with exactly two factors, both grid or choice entries, one cell per pair of values: the
  metric's mean over the finished trials that ran it (seeds, repeats) and their sample std (two or more);
- pareto: with two or more search.objectives, the finished trials no other one beats on all of them;
- protocol: how the finished trials' metrics were measured, from their tags (the line under each table).
two_way.py holds the two-way table; sweep_page.py writes the report's files, sweep_plots.py its plots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.report.build import logged_spec
from orchestrator.report.importance import Importance, param_importance, varied
from orchestrator.report.results import Row, pareto_front, result_columns, sort_rows
from orchestrator.report.two_way import DISCRETE, TwoWay, two_way_table
from orchestrator.spec.schema import Domain, ExperimentSpec
from orchestrator.tracking.keys import ABLATION_TAG, LOSS, SWEEP_TAG, TRIAL_TAG
from orchestrator.tracking.record import protocol_lines
from orchestrator.tracking.runs import run_state
from orchestrator.tracking.store import RUN_ID, child_runs, has_tag, name_is, run_by_id_or_name, search_runs
from orchestrator.tracking.system_metrics import COST_COLUMNS, run_costs

SEED_KEY = "train.seed"
FINISHED = "FINISHED"  # `run_state` of a trial that trained to the end


@dataclass
class SweepReport:
    spec: ExperimentSpec
    parent_run_id: str
    metrics: list[str]  # the task's validation metrics
    columns: list[str]  # the trials table's (trials.csv)
    rows: list[Row]  # one per trial, best first
    factors: list[str]  # the searched keys that took two or more values (the seed left out)
    importance: Importance
    two_way: TwoWay | None
    pareto: list[Row]  # two or more objectives: the finished trials on the Pareto front
    protocol: list[str]  # the metric protocols of the finished trials' numbers (record.protocol_lines)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.search.metric

    @property
    def finished(self) -> list[Row]:
        return [row for row in self.rows if row["status"] == FINISHED]


def find_parent_run(client: MlflowClient, reference: str) -> Run:
    """The parent run of a sweep or an ablation: the run with id `reference`, else the newest such run
    called `reference`. Whether it is an ablation's: its ABLATION_TAG."""
    run = run_by_id_or_name(client, reference) if RUN_ID.match(reference) else None
    if run is None:
        run = next(search_runs(client, None, f"{name_is(reference)} and {has_tag(SWEEP_TAG)}", newest_first=True), None)
    if run is None:
        names = sorted({found.info.run_name for found in search_runs(client, None, has_tag(SWEEP_TAG))})
        raise FileNotFoundError(f"no sweep or ablation called {reference!r} (nor a run with that id) in "
                                f"{client.tracking_uri}; sweeps and ablations there: {', '.join(names) or 'none'}")
    if SWEEP_TAG not in run.data.tags and ABLATION_TAG not in run.data.tags:
        raise ValueError(f"run {reference} is not the parent run of a sweep or an ablation (it has no {SWEEP_TAG} tag: "
                         "a trial, a `restorch train` job?); give a sweep's or an ablation's name or parent run id")
    return run


def _matches(value: Any, text: str) -> bool:
    if str(value) == text:
        return True
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == float(text)
    except ValueError:
        return False


def searched_value(domain: Domain | None, text: str) -> Any:
    """What a trial ran for a searched key, from its MLflow param (text): the grid or choice value it
    stands for, else the number (an int for randint), else the text."""
    if domain is not None and domain.kind in DISCRETE:
        return next((value for value in domain.values if _matches(value, text)), text)
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if domain is not None and domain.kind == "randint" else number


def trial_row(run: Run, spec: ExperimentSpec, columns: list[str]) -> Row:
    params, metrics = run.data.params, run.data.metrics
    domains = {domain.key: domain for domain in spec.search_space}
    row: Row = {column: metrics.get(column) for column in columns}
    for key in spec.searched_keys():
        row[key] = metrics[key] if key in metrics else (
            searched_value(domains.get(key), params[key]) if key in params else None)
    end = run.info.end_time
    row.update(trial=run.data.tags[TRIAL_TAG], status=run_state(run),
               wall_s=(end - run.info.start_time) / 1000 if end else None)
    return row


def build_sweep_report(client: MlflowClient, parent: Run) -> SweepReport:
    """The report of the sweep whose parent run is `parent` (`find_parent_run`), from MLflow alone."""
    from workloads.tasks import get_task

    spec = logged_spec(client, parent)
    metrics = list(get_task(spec.task.name, sigma=spec.task.sigma).protocol.metrics)
    columns = [column for column in result_columns(spec, metrics) if column != "error"]  # MLflow keeps no exception
    after_metrics = columns.index(LOSS) + 1 + len(metrics)
    columns[after_metrics:after_metrics] = [name for name in spec.objectives() if name not in columns]
    columns += COST_COLUMNS
    trials = sorted((run for run in child_runs(client, parent.info.run_id) if TRIAL_TAG in run.data.tags),
                    key=lambda run: run.data.tags[TRIAL_TAG])
    rows = sort_rows([{**trial_row(run, spec, columns), **run_costs(client, run)} for run in trials], spec.search.metric,
                     spec.search.mode)
    protocol = protocol_lines([run for run in trials if run_state(run) == FINISHED])
    finished = [row for row in rows if row["status"] == FINISHED]
    factors = [domain for domain in varied(spec.search_space, rows) if domain.key != SEED_KEY]
    two_way = (two_way_table(*factors, finished, spec.search.metric)
               if len(factors) == 2 and all(domain.kind in DISCRETE for domain in factors) else None)
    objectives = spec.objectives()
    pareto = sort_rows(pareto_front(finished, objectives), spec.search.metric, spec.search.mode) \
        if len(objectives) > 1 else []
    return SweepReport(spec, parent.info.run_id, metrics, columns, rows, [domain.key for domain in factors],
                       param_importance(spec.search_space, finished, spec.search.metric, spec.search.mode), two_way,
                       pareto, protocol)
