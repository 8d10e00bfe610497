"""Checks of spec data beyond its schema's types: the sections validated as a whole (with readable
messages), a model that builds within its bounds, a task that exists.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.spec.schema import (
    MAX_MODEL_PARAMS,
    MODEL_OPTION_LIMITS,
    ExperimentSpec,
    SpecError,
    assign,
)


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(spec)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; remove it or check its spelling (`restorch spec schema` lists valid keys)")
        elif item["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        elif not item["loc"]:  # a check across sections, whose message names its keys
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def validate_sections(raw: dict[str, Any]) -> ExperimentSpec:
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(f"invalid spec: {_format_validation_error(error)}") from None
    check_val_benchmarks(spec)
    return spec


# Benchmarks whose release the validation loader (workloads.data.PairedDataset) cannot read.
_UNREADABLE_RELEASES = {
    "sidd_blocks": "is released as MATLAB arrays of 256x256 blocks, which the validation loader does not read (it "
                   "reads image folders)",
    "dnd": "withholds its ground truth (the DND server computes the metrics)",
}


def check_val_benchmarks(spec: ExperimentSpec) -> None:
    """Each validation set that names a benchmark fits the spec's task: the benchmark's task, one of the
    noise levels its published numbers use, a release the validation loader reads."""
    from workloads.benchmarks import get_benchmark
    from workloads.tasks import DEFAULT_SIGMA

    for name, benchmark_name in spec.data.val_benchmarks.items():
        benchmark, where = get_benchmark(benchmark_name), f"data.val.{name}"
        if benchmark.task != spec.task.name:
            raise SpecError(f"{where}: {benchmark.name} is a {benchmark.task} benchmark but the spec's task is "
                            f"{spec.task.name}; validate on a {spec.task.name} benchmark or give the folder alone "
                            f"({name}: path/to/folder)")
        if benchmark.layout in _UNREADABLE_RELEASES:
            raise SpecError(f"{where}: {benchmark.name} {_UNREADABLE_RELEASES[benchmark.layout]}; validate on another "
                            "set and evaluate the trained model on it with the authors' script")
        sigma = spec.task.sigma if spec.task.sigma is not None else DEFAULT_SIGMA
        if benchmark.sigmas and sigma not in benchmark.sigmas:
            raise SpecError(f"{where}: {benchmark.name}'s published numbers are at sigma "
                            f"{'/'.join(f'{s:g}' for s in benchmark.sigmas)}, the spec's task.sigma is {sigma:g}; set "
                            "task.sigma to one of them or give the folder alone")


def check_benchmark_folder(folder: Path, benchmark: str) -> None:
    """A validation set's folder matches its benchmark's catalogue entry (count, pairing, sizes: `restorch
    data check --benchmark`'s check); a SpecError naming each problem."""
    from workloads.benchmarks import check_benchmark

    check = check_benchmark(folder, benchmark)
    if check.problems:
        raise SpecError(f"{folder} does not match the benchmark {benchmark}: " + "; ".join(check.problems)
                        + f" (`restorch data benchmarks {benchmark}` shows the entry; `restorch data check {folder} "
                        f"--benchmark {benchmark}` checks the folder alone)")


def check_model(config: dict[str, Any], where: str) -> None:
    """The model builds (on the meta device: no memory) within MODEL_OPTION_LIMITS and MAX_MODEL_PARAMS."""
    import torch

    from models import build_model

    for option, limit in MODEL_OPTION_LIMITS.items():
        value = config.get(option)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > limit for v in values):
            raise SpecError(f"{where}: model option {option} {value!r} is above {limit}, the bound on a model's "
                            f"{option}")
    try:
        with torch.device("meta"):
            model = build_model(config)
    except (ValueError, TypeError) as error:
        raise SpecError(f"{where}: {error}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_MODEL_PARAMS:
        raise SpecError(f"{where}: the model has {params / 1e6:.0f} M parameters, more than {MAX_MODEL_PARAMS / 1e6:.0f} M "
                        "(the bound on a model's size); lower dim or num_blocks")


def check_assignment(base: dict[str, Any], assignment: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The base config with `assignment` (dotted key -> value) applied together, validated as a
    whole (schema and model); errors name `where`."""
    try:
        config = assign(base, assignment)
        validate_sections(config)
    except SpecError as error:
        raise SpecError(f"{where}: {error}") from None
    check_model(config["model"], where)
    return config


def validation_metrics(spec: ExperimentSpec) -> list[str]:
    """The validation metrics of the spec's task (which must exist)."""
    from workloads.tasks import get_task

    try:
        task = get_task(spec.task.name, sigma=spec.task.sigma)
    except ValueError as error:
        raise SpecError(f"task: {error}") from None
    return list(task.protocol.metrics)
