"""The sweep's search space as Tune and Optuna take it, conditional options included.

Random and grid search (Tune's BasicVariantGenerator) enumerate grids and sample the rest. An entry whose
sub-spaces hold a grid (`enumerated`) becomes one grid over its branches: each value once per grid point
of its sub-space, `__branch__KEY` in the trial's Tune config. Its key and the grid options are read from
the branch; a sampled conditional option is drawn by Tune (`__sample__KEY`, with the searcher's seed) and
kept only in the trials that switch it on; the others get None. Optuna's samplers take a define-by-run
function that suggests an option only when its value was taken. orchestrator/spec/conditional.py's
`active_values` leaves the hidden keys and the inactive options out of a trial's config.
"""
from __future__ import annotations

import itertools
from typing import Any

from ray import tune

from orchestrator.spec.conditional import HIDDEN_PREFIX, is_active, is_conditional
from orchestrator.spec.schema import SAMPLING_ALGORITHMS, Domain, ExperimentSpec, enumerated, sub_space

BRANCH_PREFIX, SAMPLE_PREFIX = f"{HIDDEN_PREFIX}branch__", f"{HIDDEN_PREFIX}sample__"


def tune_domain(domain: Domain) -> Any:
    """The Tune search-space object of a spec entry (the kinds are named after Tune's functions)."""
    if domain.kind == "grid":
        return tune.grid_search(domain.values)
    if domain.kind == "choice":
        return tune.choice(domain.values)
    return getattr(tune, domain.kind)(*domain.values)  # uniform, loguniform, randint, quniform


def tune_param_space(spec: ExperimentSpec) -> dict[str, Any]:
    """The Tuner's param_space; empty when the searcher defines the space itself (`optuna_space`)."""
    space = spec.search_space
    if optuna_space(spec) is not None:
        return {}
    if not is_conditional(space):
        return {domain.key: tune_domain(domain) for domain in space}
    params: dict[str, Any] = {}
    for root in (domain for domain in space if domain.parent is None):
        if enumerated(space, root):
            branch = f"{BRANCH_PREFIX}{root.key}"
            params[branch] = tune.grid_search(branches(space, root))
            params.update({key: _from_branch(branch, key) for key in _branch_keys(space, root)})
        else:
            params[root.key] = tune_domain(root)
    for domain in space:
        if domain.parent is not None and domain.key not in params:
            params[f"{SAMPLE_PREFIX}{domain.key}"] = tune_domain(domain)
            params[domain.key] = _sampled_if_active(space, domain.key)
    return params


def branches(space: list[Domain], domain: Domain) -> list[dict[str, Any]]:
    """Each grid point of an enumerated entry: its value with a grid point of that value's sub-space."""
    points = []
    for value in domain.values:
        fixed = [branches(space, d) for d in sub_space(space, value=value, domain=domain) if enumerated(space, d)]
        points += [{domain.key: value, **{k: v for point in combo for k, v in point.items()}}
                   for combo in itertools.product(*fixed)]
    return points


def _branch_keys(space: list[Domain], root: Domain) -> list[str]:
    """The keys an enumerated entry's branches set: its own and its enumerated descendants'."""
    keys = [root.key]
    for value in root.values:
        for domain in sub_space(space, root, value):
            if enumerated(space, domain):
                keys += _branch_keys(space, domain)
    return keys


# Tune calls these with the trial's spec ({"config": ...}), raising for a value not resolved yet and calling
# again once it is
def _from_branch(branch: str, key: str) -> Any:
    return tune.sample_from(lambda spec: spec["config"][branch].get(key))


def _sampled_if_active(space: list[Domain], key: str) -> Any:
    def sample(spec: Any) -> Any:
        config = spec["config"]
        return config[f"{SAMPLE_PREFIX}{key}"] if is_active(space, key, config) else None

    return tune.sample_from(sample)


def optuna_space(spec: ExperimentSpec) -> DefineByRun | None:
    """An Optuna searcher's define-by-run space for a conditional space (None for a plain one: Tune's
    param_space then defines it)."""
    space = spec.search_space
    if spec.search.algorithm not in SAMPLING_ALGORITHMS or not is_conditional(space):
        return None
    return DefineByRun(space)


class DefineByRun:
    """Suggests each entry of the space whose value switched it on (an object, not a closure: Tune pickles the
    searcher with the sweep's state)."""

    def __init__(self, space: list[Domain]) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        taken: dict[str, Any] = {}
        for domain in self.space:  # an entry comes before its sub-spaces' entries
            if is_active(self.space, domain.key, taken):
                taken[domain.key] = suggest_value(trial, domain)


def suggest_value(trial: Any, domain: Domain) -> Any:
    """The value an Optuna trial suggests for an entry (Tune's conversion of its domains: randint's end excluded)."""
    lo, hi = (domain.values + [None, None])[:2]
    if domain.kind == "choice":
        return trial.suggest_categorical(domain.key, domain.values)
    if domain.kind == "randint":
        return trial.suggest_int(domain.key, lo, hi - 1)
    step = domain.values[2] if domain.kind == "quniform" else None
    return trial.suggest_float(domain.key, lo, hi, log=domain.kind == "loguniform", step=step)
