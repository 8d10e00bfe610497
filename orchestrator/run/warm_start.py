"""Warm starts (`search.warm_start: [SWEEP_NAME | PARENT_RUN_ID, ...]`): a sweep that starts from the finished
trials of earlier sweeps, read from MLflow alone (as `restorch report SWEEP` reads them: report/sweep.py).

`load_warm_start` runs before Ray starts. It refuses, naming the difference:
- a source that is not in the tracking store, or is an ablation;
- an earlier sweep whose trials mean something else: another model, task, data or training (every value that
  shapes a trial's result, the searched keys aside), another ranking metric or mode, other searched keys.
(A conditional search space takes no warm start: orchestrator/spec/conditional.py refuses it.)
An earlier trial counts when it trained to the end (FINISHED, not stopped by a scheduler) with a score; its
searched values are read back into this sweep's space (a grid or choice value, a number), and the trials whose
values lie outside this space (a narrower range, a value no longer listed) are left out, with a line saying so.

How the searcher gets them:
- optuna, gp, cmaes: Ray's OptunaSearch `points_to_evaluate` + `evaluated_rewards`, added to the study as
  completed trials (`optuna_arguments`);
- bohb: each result given to BOHB's model at the full budget (train.iterations) before its first suggestion
  (`WarmTuneBOHB`);
- random, grid: searchers that do not learn; when every entry is a grid, the trials of this sweep that an earlier
  trial already ran (same values, same spec) are skipped (`SkippingVariantGenerator`), one per earlier trial, and the
  sweep counts `skipped` fewer trials. Sampled entries draw from another random stream than an unwarmed sweep
  of the same seed (which would repeat its draws).
The sweep's parent run is tagged WARM_START_TAG with its sources (`tag_sources`).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB

from models.registry import full_options
from orchestrator.console import console
from orchestrator.report.build import logged_spec
from orchestrator.report.sweep import FINISHED, find_parent_run, trial_row
from orchestrator.spec.schema import Domain, ExperimentSpec, SpecError
from orchestrator.tracking.keys import ABLATION_TAG, TRIAL_TAG, WARM_START_TAG
from orchestrator.tracking.runs import flatten
from orchestrator.tracking.store import child_runs

# What shapes a trial's result, besides its searched values: these sections of the spec, less the keys below
# (how often it logs and checkpoints, how it loads data and recovers from crashes change no number).
RESULT_SECTIONS = ("model", "task", "data", "train")
NOT_RESULTS = {"data.cache_dir", "data.num_workers", "train.checkpoint_every", "train.log_every", "train.max_failures"}


@dataclass
class WarmStart:
    sources: dict[str, str]  # the earlier sweeps' parent run ids -> their names
    points: list[dict[str, Any]]  # their finished trials' searched values, in this sweep's space
    rewards: list[float]  # each point's search.metric
    budget: int  # the iterations behind each reward (train.iterations)
    skips: Counter = field(default_factory=Counter)  # random/grid: configuration (`_key`) -> its trials to skip

    @property
    def skipped(self) -> int:
        """The trials of this sweep that will not run: an earlier sweep ran them."""
        return sum(self.skips.values())


def load_warm_start(spec: ExperimentSpec) -> WarmStart | None:
    """The finished trials of the sweeps `spec.search.warm_start` names (None without warm_start); a SpecError
    for a source that is missing or incompatible. `spec.tracking.uri` is absolute (the driver's pinned spec)."""
    if not spec.search.warm_start:
        return None
    client = MlflowClient(spec.tracking.uri)
    sources, points, rewards, outside = {}, [], [], 0
    for reference in spec.search.warm_start:
        try:
            parent = find_parent_run(client, reference)
        except (FileNotFoundError, ValueError) as err:
            raise SpecError(f"search.warm_start: {err}") from None
        name = parent.info.run_name
        if ABLATION_TAG in parent.data.tags:
            raise SpecError(f"search.warm_start: {reference} is an ablation, not a sweep; name a sweep or its "
                            "parent run id")
        check_compatible(spec, logged_spec(client, parent), f"sweep {name} ({parent.info.run_id})")
        sources[parent.info.run_id] = name
        for row in finished_trials(client, parent.info.run_id, spec):
            if all(inside(domain, row[domain.key]) for domain in spec.search_space):
                points.append({domain.key: row[domain.key] for domain in spec.search_space})
                rewards.append(row[spec.search.metric])
            else:
                outside += 1
    warm = WarmStart(sources, points, rewards, spec.train.iterations, _skips(spec, points))
    named = ", ".join(f"{name} ({run_id})" for run_id, name in sources.items())
    console.print(f"warm start from {named}: {len(points)} finished trials" +
                  (f" ({outside} more lie outside this sweep's space, left out)" if outside else "") +
                  (f"; {warm.skipped} of this sweep's trials already ran there and are skipped" if warm.skipped else ""))
    if warm.skipped and warm.skipped == spec.trial_count():
        raise SpecError(f"search.warm_start: all {warm.skipped} trials of this sweep already ran in {named}; "
                        "add values to the space or raise search.num_samples")
    return warm


def check_compatible(spec: ExperimentSpec, earlier: ExperimentSpec, source: str) -> None:
    """Refuse (SpecError naming the first difference) an earlier sweep whose results mean something else."""
    for name, mine, theirs in (("search.metric", spec.search.metric, earlier.search.metric),
                               ("search.mode", spec.search.mode, earlier.search.mode)):
        if mine != theirs:
            raise SpecError(f"search.warm_start: {source} ranked its trials by {name} {theirs}, this sweep by {mine}; "
                            "its rewards would mean something else here")
    keys, earlier_keys = [d.key for d in spec.search_space], [d.key for d in earlier.search_space]
    if sorted(keys) != sorted(earlier_keys):
        raise SpecError(f"search.warm_start: {source} searched {', '.join(earlier_keys) or 'nothing'}, this sweep "
                        f"searches {', '.join(keys) or 'nothing'}; warm start takes a sweep over the same keys")
    if earlier.search.scheduler == "pbt":
        raise SpecError(f"search.warm_start: {source} ran pbt, whose trials change their values while they train; "
                        "no earlier result stands for one configuration")
    mine, theirs = _result_settings(spec, keys), _result_settings(earlier, keys)
    for key in sorted(mine.keys() | theirs.keys()):
        if mine.get(key) != theirs.get(key):
            raise SpecError(f"search.warm_start: {source} ran {key} = {theirs.get(key)!r}, this sweep "
                            f"{mine.get(key)!r}; warm start takes sweeps of the same model, task, data and training "
                            "(all but the searched keys)")


def _result_settings(spec: ExperimentSpec, searched: list[str]) -> dict[str, Any]:
    sections = {section: spec.config()[section] for section in RESULT_SECTIONS}
    sections["model"] = full_options(sections["model"])  # a default written out is no difference
    config = flatten(sections)
    config["deepspeed.precision"] = spec.deepspeed.precision
    return {key: value for key, value in config.items()
            if key not in NOT_RESULTS and not any(key == s or key.startswith(f"{s}.") for s in searched)}


def finished_trials(client: MlflowClient, parent_run_id: str, spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The sweep's trials that trained to the end with a score, as report rows in `spec`'s space."""
    metric = spec.search.metric
    rows = [trial_row(run, spec, [metric]) for run in child_runs(client, parent_run_id) if TRIAL_TAG in run.data.tags]
    return [row for row in rows if row["status"] == FINISHED and isinstance(row[metric], float)
            and math.isfinite(row[metric])]


def inside(domain: Domain, value: Any) -> bool:
    """Whether `value` (as read back by report/sweep.searched_value) is one this search-space entry can take."""
    if domain.kind in ("grid", "choice"):
        return any(value == candidate and type(value) is type(candidate) for candidate in domain.values)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    low, high = domain.values[0], domain.values[1]
    if domain.kind == "randint":
        return low <= value < high and float(value).is_integer()
    if domain.kind == "quniform":
        steps = (value - low) / domain.values[2]
        return low <= value <= high and abs(steps - round(steps)) < 1e-6
    return low <= value <= high


def _key(values: list[Any]) -> str:
    """One configuration (its searched values, in the space's order) as a comparable text."""
    return json.dumps([value.item() if hasattr(value, "item") else value for value in values])


def _skips(spec: ExperimentSpec, points: list[dict[str, Any]]) -> Counter:
    """random/grid with every entry a grid: each configuration of this sweep that earlier trials ran -> how many of
    its trials (num_samples of them) to skip."""
    if spec.search.algorithm not in ("random", "grid") or any(d.kind != "grid" for d in spec.search_space):
        return Counter()
    ran = Counter(_key([point[d.key] for d in spec.search_space]) for point in points)
    return Counter({key: min(count, spec.search.num_samples) for key, count in ran.items()})


# ------------------------------------------------------------------------------------------------
# the searchers


def optuna_arguments(warm: WarmStart | None) -> dict[str, Any]:
    """Ray's OptunaSearch arguments that add the earlier trials to its study as completed ones."""
    return {"points_to_evaluate": warm.points, "evaluated_rewards": warm.rewards} if warm and warm.points else {}


class SkippingVariantGenerator(BasicVariantGenerator):
    """Ray's random/grid generator, leaving out the trials an earlier sweep ran (`WarmStart.skips`)."""

    def __init__(self, warm: WarmStart, keys: list[str], *, seed: int, max_concurrent: int) -> None:
        import numpy as np

        # a stream of its own: with the seed alone it would draw what an unwarmed sweep of that seed drew
        super().__init__(random_state=np.random.default_rng([seed, len(warm.points)]), max_concurrent=max_concurrent)
        self.skips, self.keys = Counter(warm.skips), keys

    def next_trial(self) -> Any:
        while (trial := super().next_trial()) is not None:
            key = _key([trial.config.get(name) for name in self.keys])
            if not self.skips[key]:
                return trial
            self.skips[key] -= 1
            self._live_trials.discard(trial.trial_id)
        return None


def variant_generator(warm: WarmStart, spec: ExperimentSpec, max_concurrent: int) -> SkippingVariantGenerator:
    return SkippingVariantGenerator(warm, [d.key for d in spec.search_space], seed=spec.train.seed,
                                    max_concurrent=max_concurrent)


class WarmTuneBOHB(TuneBOHB):
    """Ray's TuneBOHB whose model holds the earlier trials' results (at the full budget) before it suggests."""

    def __init__(self, warm: WarmStart, **kwargs: Any) -> None:
        self.warm = warm
        super().__init__(**kwargs)

    def _setup_bohb(self) -> None:
        from ray.tune.search.bohb.bohb_search import _BOHBJobWrapper

        super()._setup_bohb()
        for point, reward in zip(self.warm.points, self.warm.rewards):
            self.bohber.new_result(_BOHBJobWrapper(self._metric_op * reward, self.warm.budget, point))


def tag_sources(warm: WarmStart, tracking: dict[str, str]) -> None:
    """The sweep's parent run names its warm-start sources: `name (run id)`, comma-separated."""
    named = ", ".join(f"{name} ({run_id})" for run_id, name in warm.sources.items())
    MlflowClient(tracking["uri"]).set_tag(tracking["parent_run_id"], WARM_START_TAG, named)
