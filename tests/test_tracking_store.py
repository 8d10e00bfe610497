"""The MLflow layer's searches (orchestrator/tracking/store.py) on a real SQLite store: they read every
page of results, not the first, and names or paths holding a quote find their runs (a quote in a filter
built by hand broke it) or, holding both kinds, are refused with a clear error."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import tiny_spec
from mlflow.tracking import MlflowClient

from orchestrator.report.build import find_ablation_run
from orchestrator.spec.load import parse_spec
from orchestrator.tracking import model_registry, store
from orchestrator.tracking.keys import ABLATION_TAG, PARENT_TAG, TRIAL_TAG
from orchestrator.tracking.runs import open_sweep_run, open_trial_run, trial_statuses

# Slow-marked as a module: with these, `make test` took 6 min on 2 cores (budget 5); CI runs them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store, made once: MLflow takes seconds to create its schema."""
    database = tmp_path_factory.mktemp("store") / "mlflow.db"
    store.open_store(f"sqlite:///{database}")
    return database


@pytest.fixture()
def uri(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def sweep_spec(tmp_path: Path, uri: str, name: str = "paged") -> object:
    raw = tiny_spec(name, tmp_path / "data", {"train.seed": {"grid": [1, 2]}},
                    tracking={"uri": uri}, storage={"path": str(tmp_path / "runs")})
    return parse_spec(raw)


def test_searches_read_every_page(tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs a page: a sweep's 5 trials are all found, by the status, the registry and the report's searches."""
    monkeypatch.setattr(store, "PAGE_SIZE", 2)
    spec = sweep_spec(tmp_path, uri)
    sweep_path = str(tmp_path / "runs" / "paged")
    tracking = open_sweep_run(spec, sweep_path, resume=False)
    client = MlflowClient(uri)
    trials = [open_trial_run(tracking, f"trial_{index}", f"paged_{index}")[0] for index in range(5)]
    for index, run_id in enumerate(trials):
        client.log_metric(run_id, "psnr", 20.0 + index)
        client.set_terminated(run_id)

    assert sorted(run.info.run_id for run in store.child_runs(client, tracking["parent_run_id"])) == sorted(trials)
    assert sorted(trial_statuses(spec, sweep_path)) == [f"trial_{index}" for index in range(5)]
    assert len(list(store.search_runs(client))) == 6  # every experiment, every page
    assert len(list(store.search_runs(client, limit=3))) == 3
    best = model_registry.resolve_source(client, "paged", "psnr", "max")
    assert best.info.run_id == trials[-1]  # the best trial is on the last page

    for index in range(4):  # more experiments than a page: a search of all of them reads each
        client.create_run(store.get_or_create_experiment(client, f"other-{index}", uri), run_name=f"other-{index}")
    assert store.run_by_id_or_name(client, "other-0").info.run_name == "other-0"
    assert len(list(store.search_runs(client))) == 10

    registry = model_registry.client_for(uri)
    registry.create_registered_model("Rain's model")  # a quote in the name, and more versions than a page
    for run_id in trials[:3]:
        registry.create_model_version("Rain's model", f"runs:/{run_id}/model", run_id=run_id)
    assert sorted(int(version.version) for version in store.model_versions(registry, "Rain's model")) == [1, 2, 3]
    assert store.model_versions(registry, "none") == []


def test_names_and_paths_with_quotes_find_their_runs(tmp_path: Path, uri: str) -> None:
    """A sweep stored under a path with a ' resumes its own parent run; a run named with a ' or a " is found
    by name (the registry's lookup), an ablation named with a ' by the report; a value with both is refused."""
    spec = sweep_spec(tmp_path, uri)
    sweep_path = str(tmp_path / "o'brien's runs" / "paged")
    tracking = open_sweep_run(spec, sweep_path, resume=False)
    assert open_sweep_run(spec, sweep_path, resume=True)["parent_run_id"] == tracking["parent_run_id"]
    trial, _ = open_trial_run(tracking, "trial_0", "paged_0")
    assert open_trial_run(tracking, "trial_0", "paged_0")[0] == trial
    assert trial_statuses(spec, sweep_path) == {"trial_0": "RUNNING"}

    client = MlflowClient(uri)
    experiment = store.get_or_create_experiment(client, "it's \"quoted\"", uri)
    assert store.experiment_id(client, "it's \"quoted\"") == experiment
    single = client.create_run(experiment, run_name="it's").info.run_id
    double = client.create_run(experiment, run_name='say "hi"', tags={ABLATION_TAG: "Rain's ablation"}).info.run_id
    client.create_run(experiment, run_name="it's", tags={PARENT_TAG: single, TRIAL_TAG: "t"})  # a trial: not it
    assert store.run_by_id_or_name(client, "it's").info.run_id == single
    assert store.run_by_id_or_name(client, 'say "hi"').info.run_id == double
    assert find_ablation_run(client, "Rain's ablation").info.run_id == double
    assert store.run_by_id_or_name(client, "it") is None
    assert store.latest_run(client, {TRIAL_TAG: "t"}, [experiment]).data.tags[PARENT_TAG] == single

    with pytest.raises(ValueError, match="holds both ' and \""):
        store.run_by_id_or_name(client, "it's \"both\"")
    with pytest.raises(FileNotFoundError, match="no ablation called 'nothing'.*ablations there: Rain's ablation"):
        find_ablation_run(client, "nothing")
