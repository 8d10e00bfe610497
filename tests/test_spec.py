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
from orchestrator.spec import SpecError, parse_spec, resolve_trial


def base_spec(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
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


def _bad(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return base_spec(tmp_path, **sections)


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
    "more CPUs than the machine has": (lambda t: _bad(t, resources={"num_workers": 512}),
                                       "resources: 512 workers x 1 CPUs"),
    "missing data folder": (lambda t: _bad(t, data={"train": str(t / "nowhere")}), "data.train: "),
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


def test_spec_errors_name_the_key():
    with pytest.raises(SpecError, match=r"^model\.glmha\.alpha: quniform step q must be > 0"):
        parse_spec({"name": "x", "model": {"name": "restormer", "attention": "glmha", "glmha": {"alpha": {"quniform": [0.1, 0.9, 0]}}},
                    "task": "deraining", "data": {"train": "a", "val": "b"}})
