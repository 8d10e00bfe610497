"""What an experiment of `restorch serve` produced, read from its storage folder (and MLflow):

- train: the metrics reported with the job's latest checkpoint (Ray Train's result in
  `{storage}/{name}`) and that checkpoint's location;
- sweep, ablate: one row per trial (Tune state, searched values, last metric, MLflow run status:
  orchestrator/run/status.py), the best trial by `search.metric`, and the report files the sweep writes
  when it ends (results.csv, best_spec.yaml); for an ablation also its paper-style table, rebuilt
  from MLflow (table.csv, table.md, table.tex).

The spec given here is the one the service queued, which its policy (orchestrator/service/policy.py)
holds to the service's storage and tracking server: nothing is read from an address that a spec in
storage names (a sweep's stored spec.yaml gives its trials, never where its runs are tracked).
Every value is plain JSON: non-finite floats (a diverged loss) become None.
"""
from __future__ import annotations

import math
from typing import Any

from orchestrator.run.jobs import absolute_storage
from orchestrator.report.results import sort_rows
from orchestrator.spec.schema import ExperimentSpec
from workloads.storage import filesystem, read_text


def experiment_folder(spec: ExperimentSpec) -> str:
    """The experiment's folder, as its job names it (the MLflow parent run's sweep tag)."""
    return f"{absolute_storage(spec.storage.path).rstrip('/')}/{spec.name}"


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars made Python ones and NaN/inf made None."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def train_result(spec: ExperimentSpec) -> dict[str, Any] | None:
    """The job's latest checkpoint and the metrics reported with it; None before the first one."""
    from ray.train import Result

    fs, path = filesystem(experiment_folder(spec), spec.storage.endpoint_url)
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run folder or no checkpoint yet
        return None
    return jsonable({"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None})


def sweep_result(spec: ExperimentSpec) -> dict[str, Any] | None:
    """The sweep's trials and its best trial so far; None before the sweep has saved its spec."""
    from orchestrator.run.status import sweep_trials

    try:
        _, rows = sweep_trials(experiment_folder(spec), spec.storage.endpoint_url, tracking_uri=spec.tracking.uri)
    except FileNotFoundError:
        return None
    ranked = sort_rows(rows, spec.search.metric, spec.search.mode)
    best = ranked[0] if ranked and ranked[0].get(spec.search.metric) is not None else None
    return jsonable({"trials": rows, "best": best})


def report_files(spec: ExperimentSpec) -> dict[str, str]:
    """The report files of a sweep or ablation that exist in its folder (name -> text)."""
    from orchestrator.run.sweep import BEST_SPEC_FILE, RESULTS_FILE

    folder = experiment_folder(spec)
    stored = {name: read_text(folder, name, spec.storage.endpoint_url) for name in (RESULTS_FILE, BEST_SPEC_FILE)}
    files = {name: text for name, text in stored.items() if text is not None}
    if spec.ablation is not None:
        files.update(ablation_tables(spec))
    return files


def ablation_tables(spec: ExperimentSpec) -> dict[str, str]:
    """An ended ablation's paper-style table (CSV, Markdown, LaTeX), rebuilt from its MLflow runs;
    none before it has ended (its parent run is tagged as an ablation's when all variants are done).
    The parent run is found by this experiment's folder, never by name: another user's ablation may
    have the same name."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report.build import build_report, table_files
    from orchestrator.tracking.keys import ABLATION_TAG, SWEEP_TAG
    from orchestrator.tracking.store import experiment_id, latest_run

    client = MlflowClient(spec.tracking.uri)
    experiment = experiment_id(client, spec.tracking.experiment or spec.name)
    parent = experiment and latest_run(client, {SWEEP_TAG: experiment_folder(spec), ABLATION_TAG: spec.name}, [experiment])
    return table_files(build_report(client, parent.info.run_id)) if parent else {}
