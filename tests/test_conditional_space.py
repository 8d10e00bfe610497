"""Conditional search spaces: a choice's or grid's value may carry a sub-space (`{value: glmha, with:
{glmha.alpha: ...}}`), searched only in the trials that take that value. Counted by `restorch spec check`,
sampled so by Tune's generator (random, grid) and by Optuna's define-by-run searcher, left out of the other
trials' configs and shown empty in their results; bad sub-spaces refused before any compute."""
from __future__ import annotations

import csv
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_spec
from servers import BIN

from orchestrator.cli import main
from orchestrator.report.importance import param_importance
from orchestrator.spec.load import parse_spec
from orchestrator.spec.trial import resolve_trial

ALPHA, KV = "model.glmha.alpha", "model.glmha.kv_reduction"
ATTENTION = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]},
                                                         "glmha.kv_reduction": {"grid": [0.25, 0.5]}}}]}


def conditional_spec(data: Path, attention: dict[str, Any] = ATTENTION, **search: Any) -> dict[str, Any]:
    return tiny_spec("conditional", data, {"model.attention": attention, "train.lr": {"loguniform": [1e-4, 1e-2]}},
                     search={"algorithm": "random", **search})


def check(tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["spec", "check", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_spec_check_counts_each_value_once_per_grid_point_of_its_sub_space(derain_data, tmp_path, capsys):
    """csa once, glmha once per kv_reduction: 3 branches, not the 2 x 2 of a grid over both; times num_samples."""
    code, out, err = check(tmp_path, conditional_spec(derain_data, num_samples=2), capsys)
    assert code == 0, err
    assert "6 trial(s)" in out
    assert f"search {ALPHA}: uniform [0.2, 1.0] (when model.attention is 'glmha')" in out
    grid = {"grid": ["csa", {"value": "glmha", "with": {"glmha": {"kv_reduction": {"grid": [0.25, 0.5, 0.75]}}}},
                     {"value": "linformer", "with": {"linformer.proj_len": {"grid": [8, 16]}}}]}
    code, out, err = check(tmp_path, conditional_spec(derain_data, grid, algorithm="grid", num_samples=1) | {
        "train": {"iterations": 6, "val_every": 3, "checkpoint_every": 3, "lr": 2e-3}}, capsys)
    assert code == 0, err
    assert "6 trial(s)" in out  # 1 + 3 + 2
    sampled = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]}}}]}
    code, out, err = check(tmp_path, conditional_spec(derain_data, sampled, num_samples=5), capsys)
    assert (code, "5 trial(s)" in out) == (0, True), err  # a choice without grids stays sampled


BAD = {
    "an option of another value": (
        {"choice": ["linformer", {"value": "glmha", "with": {"linformer.proj_len": {"grid": [8, 16]}}}]},
        "model.linformer.proj_len (in the sub-space of model.attention: 'glmha'): it is an option of 'linformer', another "
        "value of model.attention; move it into the sub-space of 'linformer'"),
    "an option the value does not have": (
        {"choice": ["csa", {"value": "glmha", "with": {"laformer.x": {"uniform": [0, 1]}}}]},
        "model.laformer.x: unknown option(s) 'laformer' for model 'restormer'"),
    "a key also searched at top level": (
        {"choice": ["csa", {"value": "glmha", "with": {"dim": {"choice": [4, 8]}}}]},
        "model.dim (in the sub-space of model.attention: 'glmha'): it is also searched at top level"),
    "a value listed twice": (
        {"choice": ["csa", "glmha", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]}}}]},
        "model.attention: the value 'glmha' is listed twice"),
    "a fixed value in a sub-space": (
        {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": 0.5}}]},
        "model.glmha.alpha: a sub-space (`with` of model.attention: 'glmha') takes search-space entries"),
    "a full dotted key": (
        {"choice": ["csa", {"value": "glmha", "with": {"model.glmha.alpha": {"uniform": [0.2, 1.0]}}}]},
        "the keys in `with` are relative to the section model; write glmha.alpha, not model.glmha.alpha"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_spec_check_refuses_bad_sub_spaces(kind, derain_data, tmp_path, capsys):
    attention, expected = BAD[kind]
    raw = conditional_spec(derain_data, attention)
    if kind == "a key also searched at top level":
        raw["model"]["dim"] = {"grid": [4, 8]}
    code, _, err = check(tmp_path, raw, capsys)
    assert code == 2 and expected in err, err


@pytest.mark.parametrize("search, expected", [
    ({"algorithm": "bohb", "scheduler": "bohb"}, "search.algorithm bohb cannot search a conditional option"),
    ({"algorithm": "cmaes"}, "model.attention: cmaes (CMA-ES) searches ranges only"),
    ({"algorithm": "optuna"}, "model.glmha.kv_reduction: optuna samples its own points and takes no {grid: [...]}"),
    ({"algorithm": "grid"}, "search.algorithm: grid takes only {grid: [...]} entries"),
    ({"algorithm": "optuna", "warm_start": ["earlier"]}, "search.warm_start: not with a conditional search space"),
])
def test_searchers_that_cannot_take_it_are_refused(search, expected, derain_data, tmp_path, capsys):
    sampled = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]},
                                                             "glmha.kv_reduction": {"grid": [0.25, 0.5]}}}]}
    if search["algorithm"] in ("bohb", "cmaes") or search.get("warm_start"):
        sampled["choice"][1]["with"]["glmha.kv_reduction"] = {"choice": [0.25, 0.5]}
    code, _, err = check(tmp_path, conditional_spec(derain_data, sampled, **search), capsys)
    assert code == 2 and expected in err, err


def test_a_trial_sets_only_the_options_of_its_value_and_the_spec_writes_back(derain_data):
    spec = parse_spec(conditional_spec(derain_data))
    base = spec.config()
    csa = resolve_trial(base, {"model.attention": "csa", ALPHA: None, KV: None, "__sample__" + ALPHA: 0.3},
                        spec.search_space)
    assert csa["model"]["attention"] == "csa" and csa["model"]["glmha"] == {}
    glmha = resolve_trial(base, {"model.attention": "glmha", ALPHA: 0.3, KV: 0.5}, spec.search_space)
    assert glmha["model"]["glmha"] == {"alpha": 0.3, "kv_reduction": 0.5}
    assert parse_spec(spec.as_written()).search_space == spec.search_space  # the stored and logged spec


def tune_configs(spec_raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The configs Tune's BasicVariantGenerator makes of the sweep's param space (num_samples x the grid)."""
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.run.search_space import tune_param_space

    spec = parse_spec(spec_raw)
    space = tune_param_space(spec)
    return [variant["config"] for _ in range(spec.search.num_samples) for _, variant in generate_variants({"config": space})]


def test_random_search_samples_options_only_for_their_value(derain_data):
    configs = tune_configs(conditional_spec(derain_data, num_samples=4))
    assert len(configs) == 12
    csa = [config for config in configs if config["model.attention"] == "csa"]
    glmha = [config for config in configs if config["model.attention"] == "glmha"]
    assert len(csa) == 4 and all(config[ALPHA] is None and config[KV] is None for config in csa)
    assert sorted(config[KV] for config in glmha) == [0.25] * 4 + [0.5] * 4
    assert all(0.2 <= config[ALPHA] <= 1.0 for config in glmha) and len({config[ALPHA] for config in glmha}) == 8
    assert all(1e-4 <= config["train.lr"] <= 1e-2 for config in configs)
    sampled = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]}}}]}
    configs = tune_configs(conditional_spec(derain_data, sampled, num_samples=40))
    assert {config["model.attention"] for config in configs} == {"csa", "glmha"}  # sampled, not enumerated
    assert all((config[ALPHA] is None) == (config["model.attention"] == "csa") for config in configs)


@pytest.mark.parametrize("algorithm", ["optuna", "gp"])
def test_optuna_suggests_options_only_for_their_value(algorithm, derain_data):
    """The sweep's own searcher (define-by-run), asked for 12 trials without Ray: a csa trial gets no glmha option."""
    from orchestrator.run.sweep import _search_algorithm
    from orchestrator.run.search_space import tune_param_space

    sampled = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]},
                                                             "glmha.kv_reduction": {"choice": [0.25, 0.5]}}}]}
    spec = parse_spec(conditional_spec(derain_data, sampled, algorithm=algorithm, num_samples=12, metric="loss",
                                       mode="min", max_concurrent_trials=1))
    assert tune_param_space(spec) == {}  # the searcher defines the space
    searcher = _search_algorithm(spec)
    pickle.dumps(searcher)  # Tune saves it with the sweep's state
    searcher.set_search_properties(None, None, {})
    configs = []
    for i in range(12):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"loss": (config.get(ALPHA) or 2.0) + config["train.lr"]})
        configs.append(config)
    kinds = {config["model.attention"] for config in configs}
    assert kinds == {"csa", "glmha"}
    for config in configs:
        active = config["model.attention"] == "glmha"
        assert (ALPHA in config, KV in config) == (active, active), config


def test_importance_leaves_inactive_options_out(derain_data):
    spec = parse_spec(conditional_spec(derain_data))
    rows = [{"model.attention": attention, ALPHA: alpha, KV: kv, "train.lr": lr, "psnr": psnr}
            for attention, alpha, kv, lr, psnr in [("csa", None, None, 1e-3, 20.0), ("glmha", 0.3, 0.25, 2e-3, 21.0),
                                                   ("glmha", 0.8, 0.5, 5e-4, 22.5), ("csa", None, None, 3e-3, 19.0),
                                                   ("glmha", 0.5, 0.25, 1e-3, 21.5), ("csa", None, None, 2e-4, 19.5)]]
    importance = param_importance(spec.search_space, rows, "psnr", "max")
    assert set(importance.values["ped_anova"]) == {"model.attention", ALPHA, KV, "train.lr"}
    assert set(importance.values["fanova"]) == {"model.attention", "train.lr"}  # the options every trial ran


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_conditional_sweep_shows_inactive_options_empty(derain_data, tmp_path):
    """`restorch sweep` of csa and glmha at two kv_reductions (3 trials, 2 iterations each): the csa trial ran
    without glmha options, and its results row leaves them empty."""
    sub = {"grid": ["csa", {"value": "glmha", "with": {"glmha.kv_reduction": {"grid": [0.25, 0.5]}}}]}
    raw = tiny_spec("conditional", derain_data, {"model.attention": sub}, search={"algorithm": "grid"},
                    train={"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sweep conditional: 3 trials" in done.stdout
    with open(tmp_path / "restorch_runs" / "conditional" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["model.attention"], row[KV], row["status"]) for row in rows) == [
        ("csa", "", "finished"), ("glmha", "0.25", "finished"), ("glmha", "0.5", "finished")]
    table = done.stdout[done.stdout.index("trial "):]
    csa_line = next(line for line in table.splitlines() if " csa " in line)
    assert csa_line.split()[2:4] == ["csa", "-"], table


def test_a_conditional_sweep_resumes_with_its_inactive_options_unset(derain_data):
    """Tune's saved trials of a random sweep: a csa trial's glmha options are None, not lost values."""
    from types import SimpleNamespace

    from orchestrator.run.sweep_resume import check_resumable
    from orchestrator.spec.schema import SpecError

    spec = parse_spec(conditional_spec(derain_data))
    csa = SimpleNamespace(trial_id="a", config={"model.attention": "csa", ALPHA: None, KV: None, "train.lr": 1e-3},
                          last_result={})
    check_resumable(spec, "folder", [csa], started=False)
    lost = SimpleNamespace(trial_id="b", config={"model.attention": "glmha", ALPHA: 0.5, KV: None, "train.lr": 1e-3},
                           last_result={})
    with pytest.raises(SpecError, match=f"lost trial b's values of {KV}"):
        check_resumable(spec, "folder", [csa, lost], started=False)


def synthetic_trial(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report({"loss": (config.get(ALPHA) or 2.0) + config["train.lr"], "iteration": 1})


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_tune_runs_a_conditional_space_with_the_sweeps_searcher(algorithm, derain_data, tmp_path):
    """A real Tune (a Ray of its own, no training) with the searcher and param space a sweep builds: every trial
    runs, a csa trial never gets glmha's alpha."""
    import sys

    import ray
    from ray import cloudpickle, tune

    from orchestrator.run.search_space import tune_param_space
    from orchestrator.run.sweep import _scheduler, _search_algorithm

    sampled = {"choice": ["csa", {"value": "glmha", "with": {"glmha.alpha": {"uniform": [0.2, 1.0]}}}]}
    spec = parse_spec(conditional_spec(derain_data, sampled, algorithm=algorithm, num_samples=8, metric="loss",
                                       mode="min", max_concurrent_trials=1))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune.Tuner(tune.with_resources(synthetic_trial, {"cpu": 1}), param_space=tune_param_space(spec),
                          tune_config=tune.TuneConfig(search_alg=_search_algorithm(spec), scheduler=_scheduler(spec),
                                                      num_samples=8),
                          run_config=tune.RunConfig(storage_path=str(tmp_path), name=algorithm, verbose=0)).fit()
    finally:
        ray.shutdown()
    assert not grid.errors and len(grid) == 8
    for result in grid:
        assert (result.config.get(ALPHA) is None) == (result.config["model.attention"] == "csa"), result.config
