"""Warm starts (`search.warm_start`, orchestrator/run/warm_start.py) and system metrics.

Fast: earlier sweeps written to MLflow as a sweep writes them (parent run with its spec, one child run per trial),
then `load_warm_start` reads them: which trials count, how they reach the searchers (Optuna's study, the grid's
skipped trials), and each refusal, before anything runs. MLflow's system-metrics monitor on a run, and the report's
cost columns from it.
Slow: a real 2-trial grid sweep, then a 3-trial grid warm-started from it by `restorch sweep`: only the new value
trains, its parent run names the source, and every trial's run has system metrics, which `restorch report` turns
into cost columns."""
from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_spec
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.run.search_space import tune_param_space
from orchestrator.run.sweep import _search_algorithm
from orchestrator.run.warm_start import load_warm_start, optuna_arguments
from orchestrator.spec.load import parse_spec
from orchestrator.spec.schema import SpecError
from orchestrator.tracking.keys import (PARENT_TAG, STOPPED_AT_TAG, STOPPED_BY_TAG, SYSTEM_CPU_PERCENT,
                                        SYSTEM_MEMORY_MB, WARM_START_TAG)
from orchestrator.tracking.runs import numeric_metrics, open_sweep_run, open_trial_run
from orchestrator.tracking.system_metrics import COST_COLUMNS, MIN_WINDOW_S, SystemMetrics, run_costs

GRID = {"model.glmha.alpha": {"grid": [0.4, 0.6]}, "model.glmha.kv_reduction": {"grid": [0.25, 0.5]}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (a new one costs seconds of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


def earlier_sweep(uri: str, raw: dict[str, Any], trials: list[tuple[dict[str, Any], float, str]]) -> str:
    """A finished sweep in the store as restorch logs one; `trials`: (searched values, psnr, status), the status
    FINISHED, FAILED or `stopped` (FINISHED with asha's stop tags). Returns its parent run id."""
    spec = parse_spec({**raw, "tracking": {"uri": uri}})
    tracking = open_sweep_run(spec, f"/sweeps/{spec.name}", resume=False)
    client = MlflowClient(uri)
    for number, (values, psnr, status) in enumerate(trials):
        run_id, _ = open_trial_run(tracking, f"t{number}", f"trial_t{number}")
        client.log_batch(run_id, metrics=numeric_metrics({"psnr": psnr, "iteration": spec.train.iterations}, 6),
                         params=[Param(key, str(value)) for key, value in values.items()])
        if status == "stopped":
            client.set_tag(run_id, STOPPED_BY_TAG, "asha")
            client.set_tag(run_id, STOPPED_AT_TAG, "3")
        client.set_terminated(run_id, "FAILED" if status == "FAILED" else "FINISHED")
    client.set_terminated(tracking["parent_run_id"], "FINISHED")
    return tracking["parent_run_id"]


def new_spec(uri: str, data: Path, name: str, space: dict[str, Any], **sections: Any) -> Any:
    search = {"warm_start": sections.pop("warm_start"), **sections.pop("search", {})}
    return parse_spec(tiny_spec(name, data, space, tracking={"uri": uri}, search=search, **sections))


@pytest.fixture(scope="module")
def grid_sweep(store: str, derain_data: Path) -> str:
    """2 x 2 grid: two trials finished, one stopped by asha, one failed."""
    return earlier_sweep(store, tiny_spec("grid-a", derain_data, GRID), [
        ({"model.glmha.alpha": 0.4, "model.glmha.kv_reduction": 0.25}, 20.0, "FINISHED"),
        ({"model.glmha.alpha": 0.6, "model.glmha.kv_reduction": 0.25}, 21.5, "FINISHED"),
        ({"model.glmha.alpha": 0.4, "model.glmha.kv_reduction": 0.5}, 25.0, "stopped"),
        ({"model.glmha.alpha": 0.6, "model.glmha.kv_reduction": 0.5}, 26.0, "FAILED"),
    ])


def test_grid_warm_start_skips_what_ran(store, derain_data, grid_sweep):
    space = {"model.glmha.alpha": {"grid": [0.4, 0.6, 0.8]}, "model.glmha.kv_reduction": {"grid": [0.25, 0.5]}}
    warm = load_warm_start(new_spec(store, derain_data, "grid-b", space, warm_start=["grid-a"]))
    assert warm.sources == {grid_sweep: "grid-a"}
    # the stopped and the failed trial do not count
    ran = sorted(zip(warm.rewards, warm.points), key=lambda pair: pair[0])
    assert ran == [(20.0, {"model.glmha.alpha": 0.4, "model.glmha.kv_reduction": 0.25}),
                   (21.5, {"model.glmha.alpha": 0.6, "model.glmha.kv_reduction": 0.25})] and warm.budget == 6
    assert warm.skipped == 2  # of the 6 trials, the two that finished there
    # by parent run id too; with two repeats per configuration, one of each is skipped
    twice = load_warm_start(new_spec(store, derain_data, "grid-c", space, warm_start=[grid_sweep],
                                     search={"num_samples": 2}))
    assert twice.skipped == 2 and set(twice.skips.values()) == {1}


def test_optuna_gets_the_trials_inside_its_space(store, derain_data, grid_sweep, capsys):
    space = {"model.glmha.alpha": {"uniform": [0.5, 0.9]}, "model.glmha.kv_reduction": {"choice": [0.25, 0.5]}}
    spec = new_spec(store, derain_data, "tpe", space, warm_start=["grid-a"], search={"algorithm": "optuna"})
    warm = load_warm_start(spec)
    assert warm.points == [{"model.glmha.alpha": 0.6, "model.glmha.kv_reduction": 0.25}] and warm.rewards == [21.5]
    assert warm.skipped == 0  # a searcher that samples: its study holds the trial instead
    assert "1 more lie outside this sweep's space, left out" in capsys.readouterr().out
    assert optuna_arguments(warm) == {"points_to_evaluate": warm.points, "evaluated_rewards": [21.5]}

    searcher = _search_algorithm(spec, warm).searcher  # under its ConcurrencyLimiter
    searcher.set_search_properties(None, None, tune_param_space(spec))
    done = searcher._ot_study.get_trials()
    assert [(trial.params, trial.value, trial.state.name) for trial in done] == [
        ({"model.glmha.alpha": 0.6, "model.glmha.kv_reduction": 0.25}, 21.5, "COMPLETE")]


@pytest.mark.parametrize("change, message", [
    ({"model": {"dim": 8}}, "ran model.dim = 4, this sweep 8; warm start takes sweeps of the same model"),
    ({"model": {"attention": "csa"}}, "ran model.attention = 'glmha', this sweep 'csa'"),
    ({"search": {"metric": "ssim"}}, "ranked its trials by search.metric psnr, this sweep by ssim"),
    ({"train": {"iterations": 12, "val_every": 3, "checkpoint_every": 3}}, "ran train.iterations = 6, this sweep 12"),
])
def test_incompatible_sweeps_are_refused(store, derain_data, grid_sweep, change, message):
    raw = tiny_spec("other", derain_data, GRID, tracking={"uri": store})
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    raw["search"]["warm_start"] = ["grid-a"]
    if raw["model"]["attention"] == "csa":
        raw["model"].pop("glmha")
        raw["model"]["ffn_expansion_factor"] = {"grid": [2.0, 2.5]}
        message = "searched model.glmha.alpha, model.glmha.kv_reduction, this sweep searches model.ffn_expansion_factor"
    with pytest.raises(SpecError) as refused:
        load_warm_start(parse_spec(raw))
    assert message in str(refused.value) and "grid-a" in str(refused.value)


def test_missing_sources_and_bad_settings_are_refused(store, derain_data, grid_sweep):
    with pytest.raises(SpecError, match="search.warm_start: no sweep or ablation called 'nope'.*sweeps and ablations "
                                        "there: grid-a"):
        load_warm_start(new_spec(store, derain_data, "x", GRID, warm_start=["nope"]))
    only_ran = {"model.glmha.alpha": {"grid": [0.4, 0.6]}, "model.glmha.kv_reduction": {"grid": [0.25]}}
    with pytest.raises(SpecError, match="all 2 trials of this sweep already ran in grid-a"):
        load_warm_start(new_spec(store, derain_data, "x", only_ran, warm_start=["grid-a"]))
    for search, reason in [({"warm_start": []}, "give one or more distinct sweep names"),
                           ({"warm_start": ["a", "a"]}, "give one or more distinct sweep names"),
                           ({"warm_start": ["a"], "algorithm": "optuna_multi", "objectives": {"psnr": "max", "params_m": "min"}},
                            "one reward per earlier trial"),
                           ({"warm_start": ["a"], "algorithm": "random", "scheduler": "pbt"}, "pbt trials change")]:
        with pytest.raises(SpecError, match=reason):
            parse_spec(tiny_spec("x", derain_data, {"train.lr": {"loguniform": [1e-4, 1e-2]}}, search=search))


def busy() -> None:
    """CPU work over more than the shortest window of a monitor's last sample."""
    start = time.monotonic()
    while time.monotonic() - start < 2 * MIN_WINDOW_S:
        sum(range(10_000))


def test_system_metrics_of_a_run_and_its_costs(store):
    """The monitor logs MLflow's system/ metrics on the run, even a run shorter than its sampling interval, and
    follows the run that replaces it; run_costs makes the report's cost columns of them."""
    client = MlflowClient(store)
    experiment = client.create_experiment("system-metrics")
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    machine = SystemMetrics(store, first)
    busy()  # psutil's first reading (0.0, measuring nothing) must not be the number
    machine.follow(second)
    busy()
    machine.stop()
    for run_id in (first, second):
        run = client.get_run(run_id)
        assert run.data.metrics[SYSTEM_CPU_PERCENT] > 0 and run.data.metrics[SYSTEM_MEMORY_MB] > 0
        costs = run_costs(client, run)
        assert list(costs) == list(COST_COLUMNS)
        assert costs["memory_peak_mb"] == max(m.value for m in client.get_metric_history(run_id, SYSTEM_MEMORY_MB))
        assert costs["gpu_pct"] is None and costs["gpu_memory_peak_mb"] is None  # no GPU here


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_sweep_warm_started_from_a_real_one(derain_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def sweep(name: str, alphas: list[float], **search: Any) -> subprocess.CompletedProcess:
        raw = tiny_spec(name, derain_data, {"model.glmha.alpha": {"grid": alphas}}, tracking={"uri": uri},
                        storage={"path": str(tmp_path / "runs")}, search={"max_concurrent_trials": 1, **search})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        done = subprocess.run([str(BIN / "restorch"), "sweep", str(path)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    sweep("first", [0.4, 0.6])
    done = sweep("second", [0.4, 0.6, 0.8], warm_start=["first"])
    assert "warm start from first" in done.stdout and "2 of this sweep's trials already ran there" in done.stdout

    client = MlflowClient(uri)
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name(name).experiment_id for name in ("first", "second")])}
    first, second = runs["first"], runs["second"]
    assert second.data.tags[WARM_START_TAG] == f"first ({first.info.run_id})"
    trials = [run for run in runs.values() if PARENT_TAG in run.data.tags]
    by_sweep = {parent.info.run_id: sorted(run.data.params["model.glmha.alpha"] for run in trials
                                           if run.data.tags[PARENT_TAG] == parent.info.run_id)
                for parent in (first, second)}
    assert by_sweep == {first.info.run_id: ["0.4", "0.6"], second.info.run_id: ["0.8"]}  # 0.4, 0.6 skipped
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.metrics[SYSTEM_CPU_PERCENT] > 0, run.data.metrics

    report = subprocess.run([str(BIN / "restorch"), "report", "second", "--tracking-uri", uri, "--out", "report"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "trials.csv").open()))
    assert [row["model.glmha.alpha"] for row in rows] == ["0.8"]
    assert float(rows[0]["cpu_pct"]) > 0 and float(rows[0]["memory_peak_mb"]) > 0


def test_a_restarted_attempt_keeps_the_machine_use_of_the_one_before(store):
    """restart_history copies the old attempt's iterations up to the checkpoint, but all of its system metrics
    (steps of samples, not iterations); the new attempt's monitor logs after them."""
    from mlflow.entities import Metric

    from orchestrator.tracking.runs import restart_history

    client = MlflowClient(store)
    old = client.create_run(client.create_experiment("attempts")).info.run_id
    client.log_batch(old, metrics=[Metric("iteration", step, 0, step) for step in range(7)] +
                     [Metric(SYSTEM_CPU_PERCENT, 40.0 + step, 0, step) for step in range(5)])
    new = restart_history(client, old, 3)
    assert [m.step for m in client.get_metric_history(new, "iteration")] == [0, 1, 2, 3]
    assert [m.value for m in client.get_metric_history(new, SYSTEM_CPU_PERCENT)] == [40.0, 41.0, 42.0, 43.0, 44.0]
    machine = SystemMetrics(store, new)
    busy()
    machine.stop()
    assert [m.step for m in client.get_metric_history(new, SYSTEM_CPU_PERCENT)] == [0, 1, 2, 3, 4, 5]
