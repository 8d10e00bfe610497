"""Ablation specs: the variants of each mode, their validation, the recipes (package data, found by
name), and a profile-only ablation (GLMHA's Table 9) tracked in MLflow and reported from there."""
from __future__ import annotations

import copy
import csv
import io
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_RESTORMER, two_factor_ablation
from mlflow.tracking import MlflowClient

from orchestrator.spec.ablation import spec_variants
from orchestrator.run.ablation_run import run_ablation
from orchestrator.cli import main
from orchestrator.spec.recipes import recipes, spec_file
from orchestrator.report.build import build_report, write_report
from orchestrator.tracking.keys import ABLATION_TAG, CSV_FILE, FACTOR_TAG, VARIANT_TAG
from orchestrator.tracking.store import child_runs
from orchestrator.spec.schema import VARIANT_KEY, SpecError
from orchestrator.spec.load import parse_spec
from orchestrator.spec.trial import resolve_trial

RECIPE_DIR = Path(__file__).parents[1] / "workloads" / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def ablation_spec(mode: str = "one_at_a_time", **ablation: Any) -> dict[str, Any]:
    """A tiny Restormer ablation: CSA baseline; attention (GLMHA, Performer) x FFN width (2.0, 1.5)."""
    return {
        "name": "tiny-ablation",
        "model": dict(TINY_RESTORMER),
        "task": "deraining",
        "data": {"train": "data/train", "val": "data/val", "patch_size": 32, "batch_size": 2},
        "ablation": two_factor_ablation(mode=mode, **ablation),
    }


def test_one_at_a_time_changes_one_factor_per_variant() -> None:
    spec = parse_spec(ablation_spec())
    rows = spec_variants(spec)
    assert [(v.label, v.factor, v.baseline) for v in rows] == [
        ("CSA", "baseline", True), ("GLMHA", "attention", False), ("Performer", "attention", False),
        ("FFN x2", "ffn", False), ("FFN x1.5", "ffn", False)]
    assert rows[3].assignments == {"model.attention": "csa", "model.ffn_expansion_factor": 2.0}
    assert spec.search_space[0].key == VARIANT_KEY and spec.trial_count() == 5


def test_factorial_crosses_factors_and_cumulative_accumulates() -> None:
    factorial = spec_variants(parse_spec(ablation_spec("factorial")))
    assert [v.label for v in factorial] == ["CSA", "GLMHA + FFN x2", "GLMHA + FFN x1.5", "Performer + FFN x2",
                                            "Performer + FFN x1.5"]
    assert factorial[4].assignments == {"model.attention": "performer", "model.ffn_expansion_factor": 1.5}
    cumulative = spec_variants(parse_spec(ablation_spec("cumulative")))
    assert [v.assignments for v in cumulative[1:]] == [
        {"model.attention": "glmha"}, {"model.attention": "performer"},
        {"model.attention": "performer", "model.ffn_expansion_factor": 2.0},
        {"model.attention": "performer", "model.ffn_expansion_factor": 1.5}]


def test_factorial_combination_equal_to_the_baseline_is_the_baseline_row() -> None:
    spec = parse_spec(yaml.safe_load((RECIPE_DIR / "hint-qkcu.yaml").read_text()))
    assert [v.label for v in spec_variants(spec)] == ["QKCU intra + inter", "intra on + inter off",
                                                      "intra off + inter on", "intra off + inter off"]


def test_a_trial_config_is_its_variant_with_its_seed() -> None:
    spec = parse_spec(ablation_spec(seeds=[1, 2]))
    assert [(d.key, d.values) for d in spec.search_space] == [
        (VARIANT_KEY, ["CSA", "GLMHA", "Performer", "FFN x2", "FFN x1.5"]), ("train.seed", [1, 2])]
    config = resolve_trial(spec.config(), {VARIANT_KEY: "FFN x1.5", "train.seed": 2})
    assert "ablation" not in config
    assert (config["model"]["attention"], config["model"]["ffn_expansion_factor"], config["train"]["seed"]) == (
        "csa", 1.5, 2)
    assert parse_spec(spec.as_written()).as_written() == spec.as_written()  # the stored spec re-parses the same


def test_list_items_are_set_by_index() -> None:
    spec = parse_spec(yaml.safe_load((RECIPE_DIR / "glmha-table9-levels.yaml").read_text()))
    attention = [resolve_trial(spec.config(), v.assignments)["model"]["attention"] for v in spec_variants(spec)]
    assert attention[2] == ["glmha", "glmha", "csa", "csa"] and attention[4] == ["glmha"] * 4


def _with(changes: dict[str, Any], **ablation: Any) -> dict[str, Any]:
    raw = ablation_spec(**ablation)
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


@pytest.mark.parametrize("raw, message", [
    (_with({}, factors={"r": [{"label": "bad", "set": {"model.attention": "glmha", "model.glmha.kv_reduction": 1.5}}]}),
     "ablation variant 'bad': glmha.kv_reduction must be in [0, 1)"),
    (_with({}, factors={"r": [{"label": "x", "set": {"search.metric": "ssim"}}]}),
     "ablation.factors.r.0.set: Value error, 'search.metric': a setting changes a dotted key under model, train, data"),
    (_with({}, factors={"r": [{"label": "x", "set": {"model.heads.7": 2}}]}),
     "ablation variant 'x': model.heads.7: '7' is neither a key nor a list index of [1, 1, 1, 1]"),
    (_with({}, factors={"r": [{"label": "CSA", "set": {"model.attention": "glmha"}}]}),
     "the label 'CSA' names two variants"),
    (_with({}, factors={"r": [{"label": "same", "set": {"model.attention": "csa"}}]}),
     "variants 'CSA' and 'same' are the same config"),
    (_with({}, factors={"r": [{"label": "x", "set": {"model.glmha.alpha": {"grid": [0.4, 0.6]}}}]}),
     "a setting takes one value, not a search-space entry"),
    (_with({"train": {"lr": {"grid": [1e-3, 2e-3]}}}), "train.lr: an ablation spec takes no search-space entries"),
    (_with({"search": {"scheduler": "asha"}}), "search.scheduler: an ablation trains every variant to the end"),
    (_with({"search": {"algorithm": "optuna"}}), "search.algorithm: an ablation runs every variant"),
    (_with({}, seeds=[1, 1]), "ablation.seeds: [1, 1] repeats a seed"),
    (_with({}, mode="leave_one_out"), "ablation.mode: Input should be 'one_at_a_time', 'factorial' or 'cumulative'"),
    (_with({}, mode="factorial", factors={name: [{"label": f"{name}{i}", "set": {"model.ffn_expansion_factor": i}}
                                                 for i in range(1, 10)] for name in ("a", "b")}),
     "ablation: up to 81 variants, more than 64 (the bound on an ablation's variants, each built to check it)"),
])
def test_every_variant_is_validated_before_anything_runs(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    assert message in str(error.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipes_parse_and_validate(recipe: Path) -> None:
    spec = parse_spec(yaml.safe_load(recipe.read_text()), source=str(recipe))
    assert spec.ablation is not None and len(spec_variants(spec)) >= 2
    assert spec.ablation.profile_only is False  # recipes train; FLOPs/Params alone: set profile_only


def test_recipes_are_package_data_found_by_name() -> None:
    """pyproject.toml ships every recipe with the package; `restorch ablate NAME` finds it there."""
    pyproject = tomllib.loads((RECIPE_DIR.parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["workloads"]
    assert all(any(recipe.relative_to(RECIPE_DIR.parent).match(glob) for glob in globs) for recipe in RECIPES)
    assert {name: path.resolve() for name, path in recipes().items()} == {path.stem: path.resolve() for path in RECIPES}
    assert spec_file("glmha-table9-levels.yaml").resolve() == (RECIPE_DIR / "glmha-table9-levels.yaml").resolve()
    assert spec_file(str(RECIPES[0])) == RECIPES[0]  # a spec file is itself
    with pytest.raises(SpecError, match="no-such-table: no such spec file, nor a recipe; recipes: glmha-table1-mst, "):
        spec_file("no-such-table")


def test_glmha_table9_profile_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Table 9 without training: 5 rows whose size falls level by level, Δ% against the CSA row,
    one tagged child run per variant; `restorch report` rebuilds the same CSV in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((RECIPE_DIR / "glmha-table9-levels.yaml").read_text())
    raw["ablation"]["profile_only"] = True
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    spec = parse_spec(copy.deepcopy(raw))
    run = run_ablation(spec)

    client = MlflowClient(run.uri)
    assert client.get_run(run.parent_run_id).data.tags[ABLATION_TAG] == "glmha-table9-levels"
    children = child_runs(client, run.parent_run_id)
    assert sorted(child.data.tags[VARIANT_TAG] for child in children) == sorted(v.label for v in spec_variants(spec))
    assert {child.data.tags[FACTOR_TAG] for child in children} == {"baseline", "glmha_levels"}

    report = build_report(client, "glmha-table9-levels")
    rows = report.rows
    assert len(rows) == 5 and rows[0]["baseline"] and rows[0]["variant"] == "CSA at all levels"
    for key in ("conv_gmacs", "params_m"):
        values = [row[key] for row in rows]
        assert all(later < earlier for earlier, later in zip(values, values[1:])), (key, values)
        for row in rows:
            assert row[f"{key}_delta_pct"] == pytest.approx((row[key] / rows[0][key] - 1) * 100)
    by_label = {child.data.tags[VARIANT_TAG]: child.data.metrics for child in children}
    assert all(row["conv_gmacs"] == by_label[row["variant"]]["conv_gmacs"] for row in rows)

    written = (write_report(report, tmp_path / "report") / CSV_FILE).read_text()
    assert [line["variant"] for line in csv.DictReader(io.StringIO(written))] == [row["variant"] for row in rows]
    fresh = tmp_path / "fresh"
    assert main(["report", "glmha-table9-levels", "--tracking-uri", run.uri, "--out", str(fresh)]) == 0
    assert (fresh / CSV_FILE).read_bytes() == written.encode()
    (fresh / CSV_FILE).write_text("edited")  # a rebuild into a report's folder replaces it only with --overwrite
    assert main(["report", "glmha-table9-levels", "--tracking-uri", run.uri, "--out", str(fresh)]) == 2
    assert (fresh / CSV_FILE).read_text() == "edited"
    assert main(["report", "glmha-table9-levels", "--tracking-uri", run.uri, "--out", str(fresh), "--overwrite"]) == 0
    assert (fresh / CSV_FILE).read_bytes() == written.encode()
