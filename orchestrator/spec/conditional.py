"""Conditional search spaces: the options of a `choice` or `grid` value's sub-space (`{value: glmha, with:
{glmha.alpha: {uniform: [0.2, 1.0]}}}`, parsed by orchestrator/spec/schema.py into Domains that name their
`parent` entry and the value `when` that switches them on) are searched only in the trials that take that
value; in the others they are inactive: not set in the trial's config, empty in its results.

`check_conditional_space` refuses what cannot mean one thing before any compute; `active_values` is what a
trial runs of what a searcher handed it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.spec.schema import Domain, ExperimentSpec, SpecError

# Searchers that cannot switch options on and off (Ray's TuneBOHB builds its ConfigSpace without conditions).
UNCONDITIONAL_ALGORITHMS = {"bohb": "Ray's TuneBOHB builds its ConfigSpace without conditions and would sample every "
                                    "sub-option in every trial"}

# Tune's config of a random or grid sweep also holds these keys (orchestrator/run/search_space.py): a trial
# runs none of them.
HIDDEN_PREFIX = "__"


def is_conditional(space: list[Domain]) -> bool:
    return any(domain.parent is not None for domain in space)


def is_active(space: list[Domain], key: str, values: Mapping[str, Any]) -> bool:
    """Whether the searched `key` is on for a trial with `values` (every entry that switches it on took its value)."""
    by_key = {domain.key: domain for domain in space}
    domain = by_key.get(key)
    while domain is not None and domain.parent is not None:
        if domain.parent not in values or values[domain.parent] != domain.when:
            return False
        domain = by_key[domain.parent]
    return True


def active_values(space: list[Domain], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values a trial runs: without the inactive options (a searcher may hand them as None) and the
    search's own hidden keys."""
    return {key: value for key, value in values.items()
            if not key.startswith(HIDDEN_PREFIX) and is_active(space, key, values)}


def check_conditional_space(spec: ExperimentSpec) -> None:
    """Sub-spaces that mean one thing: each key searched once, no value listed twice, no option of another
    value, a searcher that can switch options off."""
    space = spec.search_space
    if not is_conditional(space):
        return
    for domain in (d for d in space if any(sub.parent == d.key for sub in space)):
        for i, value in enumerate(domain.values):
            if any(value == other for other in domain.values[:i]):
                raise SpecError(f"{domain.key}: the value {value!r} is listed twice; list each value once, with its "
                                "sub-space if it has one")
    keys = [domain.key for domain in space]
    for domain in space:
        if domain.parent is None:
            continue
        where = f"{domain.key} (in the sub-space of {domain.parent}: {domain.when!r})"
        if keys.count(domain.key) > 1:
            other = next(d for d in space if d.key == domain.key and d is not domain)
            also = "searched at top level" if other.parent is None else \
                f"in the sub-space of {other.parent}: {other.when!r} too"
            raise SpecError(f"{where}: it is also {also}; search each key once (in one sub-space, or at top level "
                            "for every value)")
        if domain.key in (spec.search.hyperparam_mutations or {}):
            raise SpecError(f"{where}: pbt mutates it in every trial; search it at top level, not in a sub-space")
        parent = next(d for d in space if d.key == domain.parent)
        section = parent.key.split(".")[0]
        parts = domain.key.removeprefix(f"{section}.").split(".")
        named = next((value for value in parent.values if isinstance(value, str) and value != domain.when
                      and value in parts), None)
        if named is not None:
            raise SpecError(f"{where}: it is an option of {named!r}, another value of {parent.key}; move it into "
                            f"the sub-space of {named!r} ({{value: {named}, with: {{...}}}})")
    if spec.search.warm_start:  # Ray's OptunaSearch: "Define-by-run function ... not yet supported ... evaluated_rewards"
        raise SpecError("search.warm_start: not with a conditional search space (Ray's OptunaSearch takes no earlier "
                        "results with a define-by-run space, and skipping earlier random or grid points is not done "
                        "for sub-spaces); remove warm_start, or search every option at top level")
    algorithm = spec.search.algorithm
    if algorithm in UNCONDITIONAL_ALGORITHMS:
        first = next(domain for domain in space if domain.parent is not None)
        raise SpecError(f"{first.key}: search.algorithm {algorithm} cannot search a conditional option: "
                        f"{UNCONDITIONAL_ALGORITHMS[algorithm]}; use algorithm optuna, gp or random, or search "
                        "it at top level")
