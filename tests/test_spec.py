"""Experiment specs: parsing, search spaces, trial counts, the CLI's `spec` commands, and bad specs
rejected by `restorch sweep` with a message naming the key, before any Ray instance, MLflow run or
file exists. Fast: no Ray is started (ray.init is made to fail the test if anything calls it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.spec.schema import DataSpec, SpecError
from orchestrator.spec.load import parse_spec
from orchestrator.spec.trial import resolve_trial
from workloads.synth import write_dataset
from workloads.tasks import get_task


def base_spec(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A valid tiny sweep spec over a real dataset (the data check runs before the sweep's other checks)."""
    if not (tmp_path / "data").exists():
        write_dataset(tmp_path / "data", get_task("deraining"), count=4, size=16)
    spec = {
        "name": "glmha-sweep",
        "model": {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                  "heads": [1, 1, 1, 1], "attention": "glmha",
                  "glmha": {"alpha": {"grid": [0.4, 0.6]}, "kv_reduction": {"grid": [0.25, 0.5]}}},
        "task": "deraining",
        "data": {"train": str(tmp_path / "data/train"), "val": str(tmp_path / "data/val"), "patch_size": 16, "batch_size": 2},
        "train": {"iterations": 6, "val_every": 3, "checkpoint_every": 3, "lr": 1e-3},
        "search": {"algorithm": "grid", "scheduler": "asha"},
    }
    for key, value in sections.items():
        spec[key] = value if not isinstance(value, dict) or key == "model" else {**spec.get(key, {}), **value}
    return spec


def write(tmp_path: Path, spec: Any, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def test_search_space_is_extracted_with_dotted_keys_and_counted(tmp_path):
    raw = base_spec(tmp_path, train={"lr": {"loguniform": [1e-4, 1e-2]}}, search={"algorithm": "random", "num_samples": 3})
    spec = parse_spec(raw)
    assert [(d.key, d.kind) for d in spec.search_space] == [
        ("model.glmha.alpha", "grid"), ("model.glmha.kv_reduction", "grid"), ("train.lr", "loguniform")]
    assert spec.trial_count() == 2 * 2 * 3
    trial = resolve_trial(spec.config(), {"model.glmha.alpha": 0.6, "train.lr": 5e-4})
    assert trial["model"]["glmha"] == {"alpha": 0.6, "kv_reduction": 0.25} and trial["train"]["lr"] == 5e-4
    assert spec.as_written()["model"]["glmha"]["alpha"] == {"grid": [0.4, 0.6]}
    assert parse_spec(spec.as_written()).search_space == spec.search_space


def test_spec_check_prints_the_trial_count(tmp_path, capsys):
    path = write(tmp_path, base_spec(tmp_path, search={"num_samples": 2}))
    assert main(["spec", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "8 trial(s)" in out and "model.glmha.kv_reduction: grid [0.25, 0.5]" in out


def test_spec_schema_is_json_with_the_sections(capsys):
    assert main(["spec", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"name", "model", "task", "data", "train", "deepspeed", "resources", "search", "tracking", "storage"} <= set(schema["properties"])
    assert "search_space" not in schema["properties"]


PBT = {"scheduler": "pbt", "perturbation_interval": 3, "hyperparam_mutations": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}


def _bad(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return base_spec(tmp_path, **sections)


def alias_bomb(levels: int, width: int = 10) -> str:
    """A spec whose model's last option stands for width**levels values through nested aliases (a few
    hundred bytes)."""
    lines = ["name: bomb", "model:", "  name: restormer", "  a0: &a0 {x: 1}"]
    lines += [f"  a{i}: &a{i} {{{', '.join(f'k{k}: *a{i - 1}' for k in range(width))}}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


BAD_SPECS = {
    "unknown key": (lambda t: {**_bad(t), "epochs": 3}, "epochs: unknown key"),
    "unknown nested key": (lambda t: _bad(t, train={"iters": 5}), "train.iters: unknown key"),
    "missing section": (lambda t: {k: v for k, v in _bad(t).items() if k != "data"}, "data: required key is missing"),
    "range lo > hi": (lambda t: _bad(t, train={"lr": {"uniform": [1e-2, 1e-3]}}, search={"algorithm": "random"}),
                      "train.lr: uniform range has lo 0.01 > hi 0.001"),
    "loguniform from 0": (lambda t: _bad(t, train={"lr": {"loguniform": [0, 1e-3]}}, search={"algorithm": "random"}),
                          "train.lr: loguniform needs lo > 0"),
    "search key not a model option": (
        lambda t: _bad(t, model={"name": "restormer", "dim": 8, "attention": "glmha", "glmha": {"alhpa": {"grid": [0.4, 0.6]}}}),
        "unknown option(s) alhpa for attention 'glmha'; valid options: alpha"),
    "invalid candidate value": (lambda t: _bad(t, train={"lr": {"grid": [1e-3, -1.0]}}),
                                "train.lr: candidate value -1.0 is invalid"),
    "grid larger than max_trials": (lambda t: _bad(t, search={"max_trials": 3}),
                                    "launches 4 trials, more than search.max_trials = 3; raise search.max_trials or pass --yes"),
    "more CPUs than the machine has": (lambda t: _bad(t, resources={"num_workers": 512}, data={"batch_size": 512}),
                                       "resources: 512 workers x 1 CPUs"),
    "missing data folder": (lambda t: _bad(t, data={"train": str(t / "nowhere")}), "data.train: "),
    "missing named validation folder": (
        lambda t: _bad(t, data={"val": {"A": str(t / "data/val"), "B": str(t / "nowhere")}}), "data.val.B: "),
    "metric the task does not report": (lambda t: _bad(t, search={"metric": "mrae"}),
                                        "search.metric: 'mrae' is not reported by task deraining"),
    "grid search with a range": (lambda t: _bad(t, train={"lr": {"uniform": [1e-4, 1e-3]}}),
                                 "search.algorithm: grid takes only {grid: [...]} entries"),
    "optuna with a grid": (lambda t: _bad(t, search={"algorithm": "optuna", "scheduler": "fifo"}),
                           "model.glmha.alpha: optuna samples its own points"),
    "multi-objective with asha": (
        lambda t: _bad(t, model={"name": "restormer", "dim": 8, "glmha": {"alpha": {"choice": [0.4, 0.6]}}, "attention": "glmha"},
                       search={"algorithm": "optuna_multi", "objectives": {"psnr": "max", "conv_gmacs": "min"}}),
        "search.scheduler: asha ranks trials by one metric"),
    "search space outside model/train/data": (lambda t: _bad(t, resources={"num_workers": {"choice": [1, 2]}}),
                                              "resources.num_workers: search spaces are allowed under model, train and data only"),
    "unscored checkpoints": (lambda t: _bad(t, train={"checkpoint_every": 4}),
                             "train.checkpoint_every (4) must be a multiple of train.val_every (3)"),
    "unknown task": (lambda t: _bad(t, task="inpainting"), "task: unknown task 'inpainting'"),
    "not a mapping": (lambda t: "- just\n- a list\n", "a spec is a YAML mapping"),
    "alias bomb": (lambda t: alias_bomb(7), "spec.yaml: line 8: more than 20000 values and keys, each alias (*name) "
                                            "counted as the value it repeats (the bound on a spec's size)"),
    "alias inside its own value": (lambda t: "name: x\nmodel: &m {name: restormer, sub: *m}\n",
                                   "the alias *m (line 2) is inside the value it refers to"),
    "nested 500 deep": (lambda t: "name: x\nmodel: " + "[" * 500 + "]" * 500 + "\n",
                        "spec.yaml: line 2: nested more than 32 levels deep (the bound on a spec's nesting)"),
    "spec text too large": (lambda t: "name: x\n" + "#" * 300_000 + "\n",
                            "300009 bytes, more than 262144 (the bound on a spec's size)"),
    "search space beyond the bound": (lambda t: _bad(t, search={"num_samples": 5000}),
                                      "search: the search space has 20000 trials (the grid sizes' product x "
                                      "search.num_samples), more than 10000 (the bound on a sweep, even with --yes)"),
    "too many model values to check": (
        lambda t: _bad(t, model={**_bad(t)["model"], "glmha": {"alpha": {"choice": [i / 100 for i in range(100)]}}},
                       search={"algorithm": "random"}),
        "model: the search space has 100 distinct model values, more than 64 (the bound on model candidates"),
    "blocks beyond the bound": (lambda t: _bad(t, model={**_bad(t)["model"], "num_blocks": [2000, 1, 1, 1]}),
                                "model: model option num_blocks [2000, 1, 1, 1] is above 64, the bound on a model's "
                                "num_blocks"),
    "parameters beyond the bound": (lambda t: _bad(t, model={"name": "restormer", "dim": 480}),
                                    "M parameters, more than 1000 M (the bound on a model's size)"),
    "pbt interval off the checkpoints": (
        lambda t: _bad(t, search={**PBT, "perturbation_interval": 4}),
        "search.perturbation_interval (4) is not a multiple of train.checkpoint_every (3): pbt perturbs trials at "
        "checkpoints, so it must be a multiple of train.val_every (3) and train.checkpoint_every (3); e.g. "
        "perturbation_interval: 3"),
    "pbt without an interval": (lambda t: _bad(t, search={**PBT, "perturbation_interval": None}),
                                "search.perturbation_interval is missing"),
    "pbt interval past the end": (lambda t: _bad(t, search={**PBT, "perturbation_interval": 6}),
                                  "search.perturbation_interval (6) must be less than train.iterations (6)"),
    "pbt mutating a model option": (
        lambda t: _bad(t, search={**PBT, "hyperparam_mutations": {"model.glmha.alpha": [0.4, 0.6]}}),
        "search.hyperparam_mutations.model.glmha.alpha: pbt mutates train.lr and train.weight_decay only"),
    "pbt mutation as a grid": (
        lambda t: _bad(t, search={**PBT, "hyperparam_mutations": {"train.lr": {"grid": [1e-3, 1e-2]}}}),
        "search.hyperparam_mutations.train.lr: give a list of values, {uniform: [lo, hi]} or {loguniform: [lo, hi]}"),
    "pbt mutation out of range": (
        lambda t: _bad(t, search={**PBT, "hyperparam_mutations": {"train.weight_decay": {"uniform": [-1, 0]}}}),
        "train.weight_decay: candidate value -1 is invalid"),
    "pbt without mutations": (lambda t: _bad(t, search={**PBT, "hyperparam_mutations": None}),
                              "search.hyperparam_mutations: pbt needs the values it mutates"),
    "pbt with optuna": (
        lambda t: _bad(t, model={"name": "restormer", "dim": 8, "attention": "glmha", "glmha": {"alpha": {"choice": [0.4, 0.6]}}},
                       search={**PBT, "algorithm": "optuna"}),
        "search.algorithm: pbt explores by itself and takes no optuna searcher; use algorithm: random or grid"),
    "pbt with one trial": (lambda t: _bad(t, model={"name": "restormer", "dim": 8}, search=PBT),
                           "search.num_samples: pbt needs a population of two or more trials"),
    "pbt settings with asha": (lambda t: _bad(t, search={"perturbation_interval": 3}),
                               "search.perturbation_interval: only used by scheduler pbt (scheduler is asha)"),
}


@pytest.mark.parametrize("kind", list(BAD_SPECS))
def test_bad_spec_is_rejected_before_anything_starts(kind, tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called for a bad spec")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    make, expected = BAD_SPECS[kind]
    path = write(tmp_path, make(tmp_path))
    before = sorted(tmp_path.rglob("*"))

    assert main(["sweep", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before  # no mlflow.db, mlartifacts/, restorch_runs/ ...


def test_alias_bomb_is_refused_while_composing():
    """The loader counts what each alias stands for and never builds the expansion (10**7 values)."""
    import tracemalloc

    from orchestrator.spec.load import read_spec_yaml

    tracemalloc.start()
    with pytest.raises(SpecError, match="more than 20000 values and keys"):
        read_spec_yaml(alias_bomb(7), "bomb.yaml")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * 2**20
    assert read_spec_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}  # aliases themselves are fine


def test_spec_data_is_bounded_like_its_text(tmp_path):
    """Spec data that arrives already parsed (a JSON body) meets the same bounds, without recursion."""
    deep: Any = 1
    for _ in range(2000):
        deep = {"x": deep}
    with pytest.raises(SpecError, match=r"^body: nested more than 32 levels deep"):
        parse_spec(base_spec(tmp_path, model={"name": "restormer", "deep": deep}), source="body")
    shared = [[1] * 100] * 300
    with pytest.raises(SpecError, match=r"^body: more than 20000 values and keys"):
        parse_spec(base_spec(tmp_path, model={"name": "restormer", "shared": shared}), source="body")


def test_pbt_spec(tmp_path):
    """pbt: its mutation spaces are not search-space entries (they survive a round trip through the
    stored spec), the results show the mutated keys, and the scheduler gets lists as lists (PBT moves
    to a neighbour) and ranges as Tune domains (scaled or redrawn)."""
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.sample import Domain

    from orchestrator.run.sweep import _scheduler

    mutations = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.weight_decay": [0.0, 1e-4, 1e-2]}
    spec = parse_spec(base_spec(tmp_path, search={**PBT, "hyperparam_mutations": mutations, "quantile_fraction": 0.5}))
    assert [d.key for d in spec.search_space] == ["model.glmha.alpha", "model.glmha.kv_reduction"]
    assert spec.searched_keys() == ["model.glmha.alpha", "model.glmha.kv_reduction", "train.lr", "train.weight_decay"]
    assert parse_spec(spec.as_written()).search == spec.search
    scheduler = _scheduler(spec)
    assert isinstance(scheduler, PopulationBasedTraining) and scheduler._perturbation_interval == 3
    assert scheduler._quantile_fraction == 0.5 and scheduler._time_attr == "iteration"
    assert scheduler._hyperparam_mutations["train.weight_decay"] == [0.0, 1e-4, 1e-2]
    assert isinstance(scheduler._hyperparam_mutations["train.lr"], Domain)


def test_spec_errors_name_the_key():
    with pytest.raises(SpecError, match=r"^model\.glmha\.alpha: quniform step q must be > 0"):
        parse_spec({"name": "x", "model": {"name": "restormer", "attention": "glmha", "glmha": {"alpha": {"quniform": [0.1, 0.9, 0]}}},
                    "task": "deraining", "data": {"train": "a", "val": "b"}})


def test_several_named_validation_sets(tmp_path, monkeypatch):
    """data.val: one folder, or named sets {name: folder}: the job config carries them as written, and
    every folder is checked by its key (data.val.NAME) before a local run."""
    raw = base_spec(tmp_path)
    (tmp_path / "data" / "Rain100L").mkdir()
    sets = {"Rain100L": str(tmp_path / "data/Rain100L"), "Rain100H": str(tmp_path / "data/Rain100H")}
    spec = parse_spec({**raw, "data": {**raw["data"], "val": sets}})
    assert spec.data.val_sets == sets and spec.config()["data"]["val"] == sets
    assert spec.data.folders() == {"data.train": raw["data"]["train"], "data.val.Rain100L": sets["Rain100L"],
                                   "data.val.Rain100H": sets["Rain100H"]}
    with pytest.raises(SpecError, match=r"^data\.val\.Rain100H: .*/data/Rain100H is not a folder on this machine"):
        spec.data.check_folders()
    single = parse_spec(raw).data
    assert single.val_sets == {} and list(single.folders()) == ["data.train", "data.val"]
    single.check_folders()
    monkeypatch.chdir(tmp_path)
    assert DataSpec(train="a", val={"X": "b"}).resolved().val == {"X": str(tmp_path / "b")}


@pytest.mark.parametrize("val, message", [
    ({}, "data.val: Value error, give the validation folder, or one or more named sets {name: folder}"),
    ({"Rain 100L": "a"}, "validation set name 'Rain 100L': use letters, digits, _ . -"),
    ({"Rain100L/x": "a"}, "validation set name 'Rain100L/x'"),
    ({"Rain100L": None}, "validation set 'Rain100L' has no folder; write Rain100L: path/to/its/folder"),
])
def test_bad_validation_sets_are_named(val, message):
    with pytest.raises(SpecError) as error:
        parse_spec({"name": "x", "model": {"name": "restormer"}, "task": "deraining", "data": {"train": "a", "val": val}})
    assert message in str(error.value)
