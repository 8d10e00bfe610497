"""The authors' checkpoints in the registry (`restorch registry import`) and evaluations on a catalogued
benchmark (`restorch evaluate --model ... --benchmark NAME --data DIR`), through the CLI, on one MLflow store.

The checkpoint is a state dict in the authors' naming built from the key map's shapes (random tensors, tiny
config): no downloaded weights."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_RESTORMER
from mlflow.tracking import MlflowClient

from models.official_weights import load_official, official_shapes
from orchestrator.cli import main
from orchestrator.tracking import model_registry
from orchestrator.tracking.record import source_state
from orchestrator.tracking.keys import (BENCHMARK_SET_TAG, DATA_DIGEST_PREFIX, GIT_COMMIT_TAG, PACKAGES_ARTIFACT,
                                        PROTOCOL_VERSION_TAG, SOURCE_SHA256_TAG)
from workloads.benchmarks import BENCHMARKS, Benchmark, check_benchmark
from workloads.synth import write_dataset
from workloads.tasks import get_task

# Slow-marked as a module: with these, `make test` took 6 min on 2 cores (budget 5); CI runs them.
pytestmark = pytest.mark.slow

TINY_SET = Benchmark("TinyRainEval", "deraining", 4, "restormer", "input/ + target/", ("test entry",), size=(32, 32))
OPTIONS = [f"--set={key}={value}" for key, value in TINY_RESTORMER.items() if key != "name"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[str, Path, dict]:
    """A tiny Restormer checkpoint in the authors' format imported as `tiny-official` v1; (uri, file, its config)."""
    folder = tmp_path_factory.mktemp("import")
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in official_shapes("restormer", TINY_RESTORMER).items()}
    checkpoint = folder / "deraining_tiny.pth"
    torch.save({"params": state}, checkpoint)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    code = main(["registry", "import", "restormer", str(checkpoint), "--name", "tiny-official", "--task", "deraining",
                 *OPTIONS, "--tracking-uri", uri])
    assert code == 0
    return uri, checkpoint, state


def test_imported_checkpoint_is_a_version_with_source_digest_and_record(imported, capsys):
    uri, checkpoint, _ = imported
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert main(["registry", "show", "tiny-official/1", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"{SOURCE_SHA256_TAG}: {digest}" in out
    assert f"The authors' checkpoint `{checkpoint.name}`" in out and f"sha256 `{digest}`" in out
    assert "## Reproducibility record" in out and "git commit: " in out
    assert "metrics from checkpoint: the authors' released checkpoint deraining_tiny.pth" in out
    version = model_registry.client_for(uri).get_model_version("tiny-official", "1")
    assert version.tags["task"] == "deraining" and version.tags["protocol"].startswith("PSNR/SSIM on Y")
    run = MlflowClient(uri).get_run(version.run_id)
    assert run.data.params["model.dim"] == "8"
    assert run.data.tags.get(GIT_COMMIT_TAG) == (source_state()[0] or None)  # None outside a git checkout
    assert PACKAGES_ARTIFACT in [a.path for a in MlflowClient(uri).list_artifacts(version.run_id, "reproducibility")]


def test_the_registered_version_predicts_as_the_checkpoint_loaded_directly(imported):
    uri, checkpoint, _ = imported
    network, _ = model_registry.load_network("models:/tiny-official/1", uri)
    direct = load_official("restormer", checkpoint, TINY_RESTORMER).eval()
    batch = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(network.eval()(batch), direct(batch))


def test_a_checkpoint_that_does_not_fit_lists_its_keys_and_registers_nothing(imported, tmp_path, capsys):
    uri, _, state = imported
    broken = dict(state)
    broken["encoder_level1.0.attn.qkv_extra.weight"] = broken.pop("encoder_level1.0.attn.qkv.weight")
    path = tmp_path / "broken.pth"
    torch.save({"params": broken}, path)
    code = main(["registry", "import", "restormer", str(path), "--name", "broken", *OPTIONS, "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2
    assert "encoder_level1.0.attn.qkv_extra.weight" in err and "missing key(s): encoder_level1.0.attn.qkv.weight" in err
    assert "broken" not in model_registry.registered_names(model_registry.client_for(uri))


@pytest.fixture
def tiny_set(monkeypatch, tmp_path) -> Path:
    monkeypatch.setitem(BENCHMARKS, TINY_SET.name, TINY_SET)
    write_dataset(tmp_path / "synth", get_task("deraining"), count=5, size=32, val_fraction=0.2)
    return tmp_path / "synth" / "train"


def test_evaluation_on_a_benchmark_logs_its_protocol_and_data_digest(imported, tiny_set, capsys):
    uri = imported[0]
    digest = check_benchmark(tiny_set, TINY_SET.name).digest
    code = main(["evaluate", "--model", "models:/tiny-official/1", "--benchmark", TINY_SET.name, "--data", str(tiny_set),
                 "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"benchmark {TINY_SET.name}, data digest {digest}" in out
    run_id = re.search(r"logged to MLflow run ([0-9a-f]{32})", out)[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags[BENCHMARK_SET_TAG] == TINY_SET.name and run.data.tags[PROTOCOL_VERSION_TAG] == "1"
    assert run.data.tags[f"{DATA_DIGEST_PREFIX}{TINY_SET.name}"] == digest
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == TINY_SET.name and dataset.dataset.digest == digest[:36]
    assert dataset.dataset.source == f'{{"uri": "{tiny_set.resolve()}"}}'
    card = model_registry.client_for(uri).get_model_version("tiny-official", "1").description
    assert f"benchmark {TINY_SET.name}, metric protocol v1: PSNR/SSIM on Y" in card and f"data digest {digest}" in card


def test_a_folder_that_does_not_match_the_benchmark_fails_before_compute(imported, tiny_set, capsys):
    uri = imported[0]
    for path in (tiny_set / "input").iterdir():
        path.unlink()
        break
    shutil.rmtree(tiny_set.parent / "val")
    runs_before = len(MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("restorch-evaluations").experiment_id)
                      if MlflowClient(uri).get_experiment_by_name("restorch-evaluations") else [])
    code = main(["evaluate", "--model", "models:/tiny-official/1", "--benchmark", TINY_SET.name, "--data", str(tiny_set),
                 "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2
    assert f"does not match the benchmark {TINY_SET.name}" in err
    experiment = MlflowClient(uri).get_experiment_by_name("restorch-evaluations")
    assert len(MlflowClient(uri).search_runs(experiment.experiment_id) if experiment else []) == runs_before
