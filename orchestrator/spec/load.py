"""Reading and validating a spec: bounded YAML (`read_spec_yaml`), then every section, search space,
candidate value, model and task checked before anything runs (`parse_spec`, `load_spec`, `load_spec_text`).
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.checks import check_model, validate_sections, validation_metrics
from orchestrator.spec.conditional import check_conditional_space
from orchestrator.spec.schema import (
    MAX_CHECKED_MODELS,
    MAX_SEARCH_TRIALS,
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_NODES,
    MEDIAN_MIN_OTHERS,
    PROFILE_METRICS,
    SAMPLING_ALGORITHMS,
    SEARCHABLE_SECTIONS,
    Domain,
    ExperimentSpec,
    SpecError,
    candidate_assignments,
    extract_search_space,
    mutation_domains,
)
from orchestrator.spec.trial import resolve_trial


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than MAX_SPEC_DEPTH and documents that stand for more
    than MAX_SPEC_NODES nodes once their aliases are expanded, while composing: it counts what each
    node stands for instead of expanding anything."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0
        self.expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self.expanded:
                raise SpecError(f"{self.source}: the alias *{event.anchor} (line {event.start_mark.line + 1}) is "
                                "inside the value it refers to; a spec is a tree, write the value out")
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_SPEC_DEPTH:
            raise _too_deep(f"{self.source}: line {self.peek_event().start_mark.line + 1}")
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        self.expanded[id(node)] = 1 + sum(self.expanded[id(child)] for child in children)
        if self.expanded[id(node)] > MAX_SPEC_NODES:
            raise _too_many_nodes(f"{self.source}: line {node.start_mark.line + 1}")
        return node


def _too_deep(where: str) -> SpecError:
    return SpecError(f"{where}: nested more than {MAX_SPEC_DEPTH} levels deep (the bound on a spec's nesting); "
                     "a spec is a few levels of mappings")


def _too_many_nodes(where: str) -> SpecError:
    return SpecError(f"{where}: more than {MAX_SPEC_NODES} values and keys, each alias (*name) counted as the value "
                     "it repeats (the bound on a spec's size); write the values out instead of nesting aliases")


def spec_values(raw: Any) -> Iterator[tuple[Any, int]]:
    """Every value and key in spec data (from YAML or JSON) with its depth (`raw` itself is 1), without
    recursion; a value that appears in several places comes in each."""
    stack = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        yield value, depth
        if isinstance(value, Mapping):
            stack += [(item, depth + 1) for pair in value.items() for item in pair]
        elif isinstance(value, (list, tuple)):
            stack += [(item, depth + 1) for item in value]


def _check_data_size(raw: Any, source: str) -> None:
    """Spec data within MAX_SPEC_DEPTH and MAX_SPEC_NODES."""
    for nodes, (_, depth) in enumerate(spec_values(raw), start=1):
        if nodes > MAX_SPEC_NODES:
            raise _too_many_nodes(source)
        if depth > MAX_SPEC_DEPTH:
            raise _too_deep(source)


def _check_spec_size(size: int, source: str) -> None:
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: {size} bytes, more than {MAX_SPEC_BYTES} (the bound on a spec's size); "
                        "a spec is a few KB of settings")


def read_spec_yaml(text: str, source: str = "spec") -> Any:
    """Spec YAML text as data (yaml.safe_load's result), within the bounds on text size, nesting and
    alias expansion (a SpecError naming the bound, before any object is built)."""
    _check_spec_size(len(text.encode("utf-8", "surrogatepass")), source)
    try:
        loader = _BoundedLoader(text, source)  # its reader already refuses control characters
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise SpecError(f"{source} is not valid YAML: {error}") from None


def load_spec_text(text: str, source: str = "spec") -> ExperimentSpec:
    """The validated spec of YAML (or JSON) text: `read_spec_yaml` then `parse_spec`."""
    return parse_spec(read_spec_yaml(text, source), source=source)


def parse_spec(raw: Any, *, source: str = "spec") -> ExperimentSpec:
    """Validate spec data (already parsed YAML): schema, search space, model options, task."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a spec is a YAML mapping with name, model, task, data, ...; got {type(raw).__name__}")
    _check_data_size(raw, source)
    raw = dict(raw)
    space: list[Domain] = []
    for section in SEARCHABLE_SECTIONS:
        if section in raw:
            raw[section], found = extract_search_space(section, raw[section])
            space += found
    for section in ("deepspeed", "resources", "search", "tracking", "storage", "task", "name"):
        tree = raw.get(section)
        if section == "search" and isinstance(tree, Mapping):  # pbt's mutation spaces: see mutation_domains
            tree = {key: value for key, value in tree.items() if key != "hyperparam_mutations"}
        _, found = extract_search_space(section, tree)
        if found:
            raise SpecError(f"{found[0].key}: search spaces are allowed under model, train and data only")
    if "search_space" in raw:
        raise SpecError("search_space: unknown key; write search-space entries in place, e.g. model.glmha.alpha: {grid: [0.4, 0.6]}")
    spec = validate_sections(raw)
    spec.search_space = space
    check_conditional_space(spec)
    _check_search_size(spec)
    if spec.ablation is not None:
        from orchestrator.spec.ablation import (
            ablation_space,  # ablation.py builds on this module
        )

        spec.search_space = ablation_space(spec)
        _check_search_size(spec)
    base = spec.config()
    task_metrics = validation_metrics(spec)
    assignments = list(candidate_assignments([*space, *mutation_domains(spec.search)]))
    models = sum(next(iter(assignment)).startswith("model.") for assignment in assignments)
    if models > MAX_CHECKED_MODELS:
        raise SpecError(f"model: the search space has {models} distinct model values, more than {MAX_CHECKED_MODELS} "
                        "(the bound on model candidates, each built to check it); search fewer model values")
    check_model(base["model"], "model")
    for assignment in assignments:
        key, value = list(assignment.items())[-1]  # a conditional option's comes after the values switching it on
        trial = resolve_trial(base, assignment)
        trial.pop("search_space", None)
        if key.startswith("model."):
            check_model(trial["model"], key)
        else:
            try:
                validate_sections(trial)
            except SpecError as error:
                raise SpecError(f"{key}: candidate value {value!r} is invalid: {error}") from None
    _check_search(spec, task_metrics)
    return spec


def _check_search_size(spec: ExperimentSpec) -> None:
    """The search space's trials (counted, before any model is built) within MAX_SEARCH_TRIALS."""
    count = spec.trial_count()
    if count > MAX_SEARCH_TRIALS:
        raise SpecError(f"search: the search space has {count} trials (the grid sizes' product x search.num_samples), "
                        f"more than {MAX_SEARCH_TRIALS} (the bound on a sweep, even with --yes); use fewer grid values, "
                        "or a range with algorithm random or optuna")


def _check_search(spec: ExperimentSpec, task_metrics: list[str]) -> None:
    """The search settings fit together and name metrics the trials report."""
    search, space = spec.search, spec.search_space
    validation = ["loss", *task_metrics]
    if search.metric not in validation:
        raise SpecError(f"search.metric: {search.metric!r} is not reported by task {spec.task.name}; "
                        f"choose one of: {', '.join(validation)}")
    if search.algorithm == "optuna_multi":
        if not search.objectives or len(search.objectives) < 2:
            raise SpecError("search.objectives: optuna_multi needs two or more objectives, e.g. {psnr: max, conv_gmacs: min}")
        unknown = sorted(set(search.objectives) - {*validation, *PROFILE_METRICS})
        if unknown:
            raise SpecError(f"search.objectives: {', '.join(unknown)} not reported by the trials; "
                            f"choose from: {', '.join([*validation, *PROFILE_METRICS])}")
        if search.scheduler != "fifo":
            raise SpecError(f"search.scheduler: {search.scheduler} ranks trials by one metric; use scheduler: fifo with "
                            "optuna_multi")
    elif search.objectives:
        raise SpecError(f"search.objectives: only used by algorithm optuna_multi (algorithm is {search.algorithm}, "
                        "which optimises search.metric alone); remove it or set algorithm: optuna_multi")
    if search.algorithm == "grid" and any(d.kind != "grid" for d in space):
        kinds = sorted({d.kind for d in space if d.kind != "grid"})
        raise SpecError(f"search.algorithm: grid takes only {{grid: [...]}} entries, found {', '.join(kinds)}; use random or optuna")
    if search.algorithm in SAMPLING_ALGORITHMS:
        grids = [d.key for d in space if d.kind == "grid"]
        if grids:
            raise SpecError(f"{grids[0]}: {search.algorithm} samples its own points and takes no {{grid: [...]}} "
                            "entries; write {choice: [...]} instead")
        if not space:
            raise SpecError(f"search.algorithm: {search.algorithm} needs a search space; add an entry such as "
                            "model.glmha.alpha: {uniform: [0.2, 0.8]}")
    _check_searcher_space(search.algorithm, space)
    _check_scheduler(spec)
    val_every, checkpoint_every = spec.train.val_every, spec.train.checkpoint_every
    if checkpoint_every % val_every:
        raise SpecError(f"train.checkpoint_every ({checkpoint_every}) must be a multiple of train.val_every ({val_every}) "
                        "so that every checkpoint is scored by search.metric; e.g. checkpoint_every: "
                        f"{val_every * max(1, round(checkpoint_every / val_every))}")
    _check_pbt(spec)


def _check_searcher_space(algorithm: str, space: list[Domain]) -> None:
    """The entry kinds cmaes and bohb can search."""
    if algorithm == "cmaes":
        choices = [d.key for d in space if d.kind == "choice"]
        if choices:
            raise SpecError(f"{choices[0]}: cmaes (CMA-ES) searches ranges only ({{uniform: ...}}, {{loguniform: ...}}, "
                            "{quniform: ...}, {randint: ...}), not {choice: [...]}; write a range, or use algorithm gp "
                            "or optuna, which take choices")
    if algorithm == "bohb":
        quantized = [d.key for d in space if d.kind == "quniform"]
        if quantized:
            raise SpecError(f"{quantized[0]}: bohb drops quniform's step (its ConfigSpace has none) and would try "
                            "values off it; write {choice: [...]} of the values, or {uniform: [lo, hi]}")
        missing = [name for name in ("hpbandster", "ConfigSpace") if importlib.util.find_spec(name) is None]
        if missing:  # Ray's TuneBOHB imports them only when the sweep starts
            raise SpecError(f"search.algorithm: bohb needs the package(s) {', '.join(missing)}, which are not "
                            "installed; reinstall restorch, or use algorithm gp or optuna")


def _check_scheduler(spec: ExperimentSpec) -> None:
    """The scheduler fits the searcher and has trials enough to act on (pbt: `_check_pbt`)."""
    search, algorithm, scheduler = spec.search, spec.search.algorithm, spec.search.scheduler
    if algorithm == "bohb" and scheduler != "bohb":
        raise SpecError(f"search.scheduler: algorithm bohb learns from the budgets at HyperBand's rungs and needs "
                        f"scheduler: bohb (HyperBandForBOHB), not {scheduler}; set scheduler: bohb")
    if scheduler == "bohb" and algorithm != "bohb":
        raise SpecError(f"search.algorithm: scheduler bohb (HyperBandForBOHB) works with algorithm bohb only, not "
                        f"{algorithm}; set algorithm: bohb, or use scheduler hyperband or asha")
    if scheduler == "hyperband":
        if algorithm not in ("random", "grid"):
            raise SpecError(f"search.scheduler: hyperband pauses trials until all of its bracket reach a rung, but "
                            f"{algorithm} suggests a new trial only when a running one ends, so brackets never fill; "
                            f"use scheduler asha or median with {algorithm}, or algorithm and scheduler bohb")
        # Ray's HyperBand first fills its bracket that stops nothing (s = 0), as many trials as it has brackets
        brackets = round(math.log(spec.train.iterations) / math.log(search.reduction_factor)) + 1
        if spec.trial_count() <= brackets:
            raise SpecError(f"search.scheduler: hyperband runs its first {brackets} trials to the end (its bracket "
                            f"that stops none, for train.iterations {spec.train.iterations} and reduction_factor "
                            f"{search.reduction_factor:g}), and this sweep has {spec.trial_count()} trials; raise "
                            f"search.num_samples so that it has more than {brackets}, or use scheduler asha")
    if scheduler == "median" and spec.trial_count() <= MEDIAN_MIN_OTHERS:
        raise SpecError(f"search.scheduler: median stopping compares a trial with {MEDIAN_MIN_OTHERS} or more others "
                        f"and this sweep has {spec.trial_count()} trials, so it would stop none; raise "
                        f"search.num_samples so that it has more than {MEDIAN_MIN_OTHERS}, or use scheduler fifo")


def _check_pbt(spec: ExperimentSpec) -> None:
    """pbt's settings (and no pbt settings with another scheduler)."""
    search, train = spec.search, spec.train
    if search.scheduler != "pbt":
        given = [name for name in ("perturbation_interval", "hyperparam_mutations") if getattr(search, name) is not None]
        if given:
            raise SpecError(f"search.{given[0]}: only used by scheduler pbt (scheduler is {search.scheduler}); "
                            "remove it or set scheduler: pbt")
        return
    if search.algorithm not in ("random", "grid"):
        raise SpecError(f"search.algorithm: pbt explores by itself and takes no {search.algorithm} searcher; use "
                        "algorithm: random or grid (the initial population)")
    if not search.hyperparam_mutations:
        raise SpecError("search.hyperparam_mutations: pbt needs the values it mutates, e.g. "
                        "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}, train.weight_decay: [0, 1.0e-4, 1.0e-2]}")
    interval, step = search.perturbation_interval, train.checkpoint_every  # checkpoint_every: a multiple of val_every
    if interval is None or interval % step:
        problem = "is missing" if interval is None else f"({interval}) is not a multiple of train.checkpoint_every ({step})"
        raise SpecError(f"search.perturbation_interval {problem}: pbt perturbs trials at checkpoints, so it must be a "
                        f"multiple of train.val_every ({train.val_every}) and train.checkpoint_every ({step}); e.g. "
                        f"perturbation_interval: {step * max(1, round((interval or 0) / step))}")
    if interval >= train.iterations:
        raise SpecError(f"search.perturbation_interval ({interval}) must be less than train.iterations "
                        f"({train.iterations}), or pbt never perturbs a trial")
    if spec.trial_count() < 2:
        raise SpecError("search.num_samples: pbt needs a population of two or more trials; raise num_samples or add "
                        "{grid: [...]} entries")


def load_spec(path: str | Path) -> ExperimentSpec:
    """The validated spec of a YAML file (`load_spec_text`)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    _check_spec_size(path.stat().st_size, str(path))  # before reading it
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path} is not UTF-8 text: {error}") from None
    return load_spec_text(text, str(path))


def check_trial_limit(spec: ExperimentSpec, *, yes: bool) -> None:
    count = spec.trial_count()
    if count > spec.search.max_trials and not yes:
        raise SpecError(
            f"this sweep launches {count} trials, more than search.max_trials = {spec.search.max_trials}; "
            "raise search.max_trials or pass --yes"
        )
