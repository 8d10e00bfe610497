"""Ablation studies: the variants of a baseline that one paper-style table compares.

An ablation is an experiment spec with an `ablation:` section (schema: `AblationSpec` in
orchestrator/spec/schema.py):

    ablation:
      mode: one_at_a_time                  # or factorial, cumulative
      baseline: {label: CSA, set: {model.attention: csa}}
      factors:
        kv_reduction:
          - {label: "GLMHA r=0.25", set: {model.attention: glmha, model.glmha.kv_reduction: 0.25}}
          - {label: "GLMHA r=0.5", set: {model.attention: glmha, model.glmha.kv_reduction: 0.5}}
      seeds: [100, 101, 102]               # optional: each variant once per seed, reported as mean ± std
      profile_only: false                  # true: the FLOPs/Params columns only, nothing trained

A setting's `set` maps dotted keys under model, train or data to values (a number picks a list
item: model.attention.0 is level 1's attention). The baseline's `set` applies to every variant.
The variants (`variants`), baseline first:
- one_at_a_time: the baseline with each setting of each factor alone;
- factorial: the baseline with every combination of one setting per factor (the combination that
  equals the baseline is the baseline row);
- cumulative: the settings of all factors in order, each row adding one more to the previous row
  (GLMHA's Table 9: GLMHA replaces CSA one level deeper per row).

The variants run as a sweep (orchestrator/run/ablation_run.py): its search space (`ablation_space`) is
a grid over the variant labels at VARIANT_KEY, which `orchestrator.spec.trial.resolve_trial` expands into the variant's
assignments, times a grid over train.seed. Every variant is validated before anything runs.

Recipes (the papers' ablations, small scale) ship with the package in workloads/recipes/
(orchestrator/spec/recipes.py finds one by name: `restorch ablate glmha-table9-levels`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from orchestrator.spec.checks import check_assignment
from orchestrator.spec.schema import (
    MAX_CHECKED_MODELS,
    VARIANT_KEY,
    AblationSpec,
    Domain,
    ExperimentSpec,
    SpecError,
    assign,
)

BASELINE_FACTOR = "baseline"


@dataclass
class Variant:
    label: str
    factor: str  # BASELINE_FACTOR, the factor whose setting the row adds, or "a × b" (factorial)
    assignments: dict[str, Any]  # dotted key -> value, the baseline's included
    baseline: bool = False


def variants(ablation: AblationSpec, base: dict[str, Any]) -> list[Variant]:
    """The ablation's variants in table order, baseline first; `base` is the spec's config."""
    baseline = Variant(ablation.baseline.label, BASELINE_FACTOR, dict(ablation.baseline.set), baseline=True)
    rows = [baseline]
    if ablation.mode == "one_at_a_time":
        rows += [Variant(setting.label, factor, {**baseline.assignments, **setting.set})
                 for factor, settings in ablation.factors.items() for setting in settings]
    elif ablation.mode == "cumulative":
        applied = baseline.assignments
        for factor, settings in ablation.factors.items():
            for setting in settings:
                applied = {**applied, **setting.set}
                rows.append(Variant(setting.label, factor, applied))
    else:
        baseline_config = assign(base, baseline.assignments)
        for combination in itertools.product(*ablation.factors.values()):
            assignments = dict(baseline.assignments)
            for setting in combination:
                assignments.update(setting.set)
            if assign(base, assignments) != baseline_config:
                rows.append(Variant(" + ".join(setting.label for setting in combination),
                                    " × ".join(ablation.factors), assignments))
    return rows


def spec_variants(spec: ExperimentSpec) -> list[Variant]:
    """The variants of an ablation spec."""
    if spec.ablation is None:
        raise SpecError(f"{spec.name}: the spec has no ablation section")
    return variants(spec.ablation, spec.config())


def variant_assignments(ablation: dict[str, Any], base: dict[str, Any], label: str) -> dict[str, Any]:
    """The assignments of the variant called `label` (`ablation`: the section as plain data)."""
    found = {variant.label: variant.assignments for variant in variants(AblationSpec.model_validate(ablation), base)}
    if label not in found:
        raise SpecError(f"{VARIANT_KEY}: no variant {label!r}; the variants are: {', '.join(found)}")
    return found[label]


def ablation_space(spec: ExperimentSpec) -> list[Domain]:
    """The sweep's search space (the variant labels, times the seeds when training), after checking
    the search settings and validating every variant as a whole config."""
    _check_search(spec)
    sizes = [len(settings) for settings in spec.ablation.factors.values()]
    count = math.prod(sizes) if spec.ablation.mode == "factorial" else 1 + sum(sizes)
    if count > MAX_CHECKED_MODELS:
        raise SpecError(f"ablation: up to {count} variants, more than {MAX_CHECKED_MODELS} (the bound on an ablation's "
                        "variants, each built to check it); ablate fewer settings")
    base = spec.config()
    rows = spec_variants(spec)
    labels = [variant.label for variant in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SpecError(f"ablation: the label {repeated[0]!r} names two variants; labels name the table's rows, "
                        "make each one unique")
    configs: list[tuple[str, dict[str, Any]]] = []
    for variant in rows:
        config = check_assignment(base, variant.assignments, f"ablation variant {variant.label!r}")
        same = [label for label, earlier in configs if earlier == config]
        if same:
            raise SpecError(f"ablation: variants {same[0]!r} and {variant.label!r} are the same config; drop one "
                            "or change its settings")
        configs.append((variant.label, config))
    space = [Domain(key=VARIANT_KEY, kind="grid", values=labels)]
    if spec.ablation.seeds and not spec.ablation.profile_only:
        space.append(Domain(key="train.seed", kind="grid", values=spec.ablation.seeds))
    return space


def _check_search(spec: ExperimentSpec) -> None:
    """An ablation is a full grid over its variants: no other search, nothing stopped early."""
    if spec.search_space:
        raise SpecError(f"{spec.search_space[0].key}: an ablation spec takes no search-space entries; "
                        "write each value as a setting of a factor under ablation.factors")
    search, seeds = spec.search, spec.ablation.seeds or []
    if search.algorithm not in ("random", "grid"):
        raise SpecError(f"search.algorithm: an ablation runs every variant (a grid), not {search.algorithm}; "
                        "remove search.algorithm or set it to grid")
    if search.scheduler != "fifo":
        raise SpecError("search.scheduler: an ablation trains every variant to the end (fifo); asha would stop some "
                        "early and leave holes in the table")
    if search.num_samples != 1:
        raise SpecError("search.num_samples: an ablation runs each variant once per seed; repeat variants with "
                        "ablation.seeds: [...] instead")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"ablation.seeds: {seeds} repeats a seed; list each seed once")
