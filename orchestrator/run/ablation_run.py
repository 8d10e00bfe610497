"""Running an ablation (`restorch ablate`): its variants as one sweep, tracked in MLflow.

- Training: `run_sweep` (orchestrator/run/sweep.py) runs the spec, whose search space is the grid over
  the variants (and seeds) made by orchestrator/spec/ablation.py: same Ray Tune trials, same MLflow parent
  and child runs, resumed the same way when run again. Afterwards every child run is tagged with its
  variant, factor and seed (from the sweep's rows: trial id -> searched values).
- `profile_only`: no Ray. Each variant's model is profiled on the meta device and logged as a child
  run of a new parent run, tagged the same way.
Either way the parent run gets the ABLATION_TAG (the ablation's name), by which `restorch report`
finds it; orchestrator/report/build.py then builds the table from these runs alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from models.profile import size_metrics
from orchestrator.spec.ablation import Variant, spec_variants
from orchestrator.run.jobs import absolute_storage
from orchestrator.spec.schema import VARIANT_KEY, ExperimentSpec
from orchestrator.spec.trial import resolve_trial
from orchestrator.run.sweep import run_sweep
from orchestrator.tracking.keys import ABLATION_TAG, FACTOR_TAG, SEED_TAG, TRIAL_TAG, VARIANT_TAG
from orchestrator.tracking.runs import close_sweep_run, numeric_metrics, open_sweep_run, open_trial_run
from orchestrator.tracking.store import child_runs, resolve_uri


@dataclass
class AblationRun:
    uri: str  # the MLflow tracking URI
    parent_run_id: str
    errors: int  # trials that failed


def run_ablation(spec: ExperimentSpec, *, address: str | None = None, yes: bool = False) -> AblationRun:
    """Run (or resume) every variant of the ablation spec; returns where its runs are."""
    if spec.ablation.profile_only:
        run = _profile_variants(spec)
    else:
        outcome = run_sweep(spec, address=address, yes=yes)
        run = AblationRun(resolve_uri(outcome.spec.tracking.uri), outcome.parent_run_id, outcome.errors)
        _tag_trials(spec, run, {row["trial"]: row for row in outcome.rows})
    MlflowClient(run.uri).set_tag(run.parent_run_id, ABLATION_TAG, spec.name)
    return run


def _variant_tags(variant: Variant, seed: int) -> list[RunTag]:
    return [RunTag(VARIANT_TAG, variant.label), RunTag(FACTOR_TAG, variant.factor), RunTag(SEED_TAG, str(seed))]


def _tag_trials(spec: ExperimentSpec, run: AblationRun, rows: dict[str, dict]) -> None:
    """Tag each trial's child run with the variant and seed the trial ran."""
    client = MlflowClient(run.uri)
    by_label = {variant.label: variant for variant in spec_variants(spec)}
    for child in child_runs(client, run.parent_run_id):
        row = rows.get(child.data.tags.get(TRIAL_TAG))
        if row is not None:
            seed = row.get("train.seed", spec.train.seed)
            client.log_batch(child.info.run_id, tags=_variant_tags(by_label[row[VARIANT_KEY]], seed))


def _profile_variants(spec: ExperimentSpec) -> AblationRun:
    """A parent run and one finished child run per variant holding its model-size metrics."""
    tracking = open_sweep_run(spec, f"{absolute_storage(spec.storage.path)}/{spec.name}", resume=False)
    client = MlflowClient(tracking["uri"])
    base = spec.config()
    for index, variant in enumerate(spec_variants(spec)):
        profile = size_metrics(resolve_trial(base, variant.assignments)["model"])
        run_id, _ = open_trial_run(tracking, f"variant_{index:03d}", variant.label)
        client.log_batch(run_id, metrics=numeric_metrics(profile, 0),
                         params=[Param(key, str(value)) for key, value in variant.assignments.items()],
                         tags=_variant_tags(variant, spec.train.seed))
        client.set_terminated(run_id)
    close_sweep_run(tracking, failed=False, files={}, best={})
    return AblationRun(tracking["uri"], tracking["parent_run_id"], errors=0)
