"""Search algorithms and schedulers: the searcher and scheduler the sweep builds from a spec
(orchestrator/run/sweep.py `_search_algorithm`, `_scheduler`) for each value, and the pairs that do not
fit refused by `restorch spec check` before any compute."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_spec

from orchestrator.cli import main
from orchestrator.spec.load import parse_spec
from orchestrator.spec.schema import ExperimentSpec

SPACE = {"train.lr": (1e-4, 2e-3), "train.weight_decay": (0.0, 0.1)}


def synthetic_spec(data: Path, *, iterations: int = 1, **search: Any) -> ExperimentSpec:
    space = {key: {"uniform": list(bounds)} for key, bounds in SPACE.items()}
    return parse_spec(tiny_spec("synthetic", data, space, search={"algorithm": "random", "metric": "loss", "mode": "min",
                                                              "max_concurrent_trials": 1, **search},
                                train={"iterations": iterations, "val_every": 1, "checkpoint_every": 1}))


BAD_PAIRS = {
    "bohb without its scheduler": (
        {"algorithm": "bohb"}, "search.scheduler: algorithm bohb learns from the budgets at HyperBand's rungs and "
                               "needs scheduler: bohb (HyperBandForBOHB), not fifo"),
    "bohb scheduler with another searcher": (
        {"algorithm": "gp", "scheduler": "bohb"}, "search.algorithm: scheduler bohb (HyperBandForBOHB) works with "
                                                  "algorithm bohb only, not gp"),
    "pbt with bohb": (
        {"algorithm": "bohb", "scheduler": "pbt", "perturbation_interval": 3,
         "hyperparam_mutations": {"train.lr": {"loguniform": [1e-4, 1e-2]}}},
        "needs scheduler: bohb (HyperBandForBOHB), not pbt"),
    "cmaes with a choice": (
        {"algorithm": "cmaes", "space": {"model.glmha.alpha": {"choice": [0.4, 0.6]}}},
        "model.glmha.alpha: cmaes (CMA-ES) searches ranges only"),
    "cmaes with a grid": (
        {"algorithm": "cmaes", "space": {"model.glmha.alpha": {"grid": [0.4, 0.6]}}},
        "model.glmha.alpha: cmaes samples its own points and takes no {grid: [...]} entries"),
    "gp with a grid": (
        {"algorithm": "gp", "space": {"model.glmha.alpha": {"grid": [0.4, 0.6]}}},
        "model.glmha.alpha: gp samples its own points"),
    "grid algorithm with a range": (
        {"algorithm": "grid"}, "search.algorithm: grid takes only {grid: [...]} entries"),
    "bohb with a quantized range": (
        {"algorithm": "bohb", "scheduler": "bohb", "space": {"model.glmha.alpha": {"quniform": [0.2, 1.0, 0.2]}}},
        "model.glmha.alpha: bohb drops quniform's step"),
    "multi-objective gp": (
        {"algorithm": "gp", "objectives": {"psnr": "max", "conv_gmacs": "min"}},
        "search.objectives: only used by algorithm optuna_multi (algorithm is gp, which optimises search.metric alone)"),
    "multi-objective with median stopping": (
        {"algorithm": "optuna_multi", "scheduler": "median", "objectives": {"psnr": "max", "conv_gmacs": "min"}},
        "search.scheduler: median ranks trials by one metric; use scheduler: fifo with optuna_multi"),
    "hyperband with a sampling searcher": (
        {"algorithm": "optuna", "scheduler": "hyperband", "num_samples": 8},
        "search.scheduler: hyperband pauses trials until all of its bracket reach a rung, but optuna suggests"),
    "hyperband with too few trials": (
        {"algorithm": "random", "scheduler": "hyperband", "num_samples": 3},
        "search.scheduler: hyperband runs its first 4 trials to the end"),
    "median with too few trials": (
        {"algorithm": "random", "scheduler": "median", "num_samples": 3},
        "search.scheduler: median stopping compares a trial with 3 or more others and this sweep has 3 trials"),
}


@pytest.mark.parametrize("kind", list(BAD_PAIRS))
def test_spec_check_refuses_pairs_that_do_not_fit(kind, derain_data, tmp_path, capsys):
    search, expected = BAD_PAIRS[kind]
    search = dict(search)
    space = search.pop("space", {"train.lr": {"uniform": [1e-4, 2e-3]}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec("pair", derain_data, space, search=search)))
    assert main(["spec", "check", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("search", [{"algorithm": "gp", "scheduler": "median", "num_samples": 4},
                                    {"algorithm": "cmaes", "scheduler": "asha", "num_samples": 4},
                                    {"algorithm": "bohb", "scheduler": "bohb", "num_samples": 4},
                                    {"algorithm": "random", "scheduler": "hyperband", "num_samples": 5}])
def test_spec_check_accepts_pairs_that_fit(search, derain_data, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    spec = tiny_spec("pair", derain_data, {"train.lr": {"loguniform": [1e-4, 2e-3]},
                                           "model.glmha.alpha": {"uniform": [0.2, 1.0]}}, search=search)
    path.write_text(yaml.safe_dump(spec))
    assert main(["spec", "check", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("search, searcher, sampler, scheduler", [
    ({"algorithm": "gp", "scheduler": "median", "num_samples": 4}, "OptunaSearch", "GPSampler", "MedianStoppingRule"),
    ({"algorithm": "cmaes"}, "OptunaSearch", "CmaEsSampler", "FIFOScheduler"),
    ({"algorithm": "bohb", "scheduler": "bohb"}, "TuneBOHB", None, "HyperBandForBOHB"),
    ({"scheduler": "hyperband", "num_samples": 5}, "BasicVariantGenerator", None, "HyperBandScheduler"),
])
def test_the_sweep_builds_the_searcher_and_scheduler_of_the_spec(search, searcher, sampler, scheduler, derain_data):
    """Without Ray: what `restorch sweep` hands Tune for each new value, with the spec's seed, metric and limits."""
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.run.sweep import _scheduler, _search_algorithm

    spec = synthetic_spec(derain_data, iterations=9, max_concurrent_trials=2, **search)
    built = _search_algorithm(spec)
    inner = built.searcher if isinstance(built, ConcurrencyLimiter) else built
    assert type(inner).__name__ == searcher
    if sampler:
        assert type(inner._sampler).__name__ == sampler and built.max_concurrent == 2
    if searcher == "TuneBOHB":
        assert (inner._max_concurrent, inner._seed, inner.metric, inner.mode) == (2, spec.train.seed, "loss", "min")
    if searcher == "BasicVariantGenerator":
        assert built.max_concurrent == 0  # hyperband: the trial slots bound it (paused trials count as running)
    built_scheduler = _scheduler(spec)
    assert type(built_scheduler).__name__ == scheduler
    assert getattr(built_scheduler, "_time_attr", "iteration") == "iteration"
