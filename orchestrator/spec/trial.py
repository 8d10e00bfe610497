"""A trial's config: the base spec's config with the values a search sampled for it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.spec.ablation import variant_assignments
from orchestrator.spec.conditional import active_values
from orchestrator.spec.schema import VARIANT_KEY, Domain, assign


def resolve_trial(base: dict[str, Any], values: Mapping[str, Any], space: list[Domain] | None = None) -> dict[str, Any]:
    """The config of one trial: the base config with the sampled values set at their dotted keys; with the
    search `space`, an option of a sub-space whose value the trial did not take is not set. An ablation's
    VARIANT_KEY value (a variant's label) stands for that variant's assignments; the trial's config is then
    the variant's own plain config, without the ablation section."""
    values = active_values(space, values) if space else dict(values)
    if VARIANT_KEY not in values:
        return assign(base, values)
    label = values.pop(VARIANT_KEY)
    config = assign(base, values)
    return assign(config, variant_assignments(config.pop("ablation"), base, label))
