"""The model registry: registering runs, aliases, errors, loading and restoring with a version."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_RESTORMER
from models import build_model
from orchestrator import registry
from orchestrator.cli import main
from workloads.files import image_bit_depth, read_image, write_image


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def finished_run(uri: str, tmp_path: Path, *, with_model: bool = True, metrics: dict | None = None) -> tuple[str, torch.nn.Module]:
    """A run as a finished training job leaves it: params, validation metrics, model/model.pt."""
    torch.manual_seed(0)
    network = build_model(TINY_RESTORMER).eval()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("jobs")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "jobs", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment_id, run_name="job").info.run_id
    client.log_param(run_id, "task.name", "deraining")
    for name, value in (metrics if metrics is not None else {"psnr": 30.5, "ssim": 0.9, "conv_gmacs": 1.25}).items():
        client.log_metric(run_id, name, value)
    if with_model:
        weights = tmp_path / "model.pt"
        torch.save({"model_config": TINY_RESTORMER, "state_dict": network.state_dict()}, weights)
        client.log_artifact(run_id, str(weights), "model")
    client.set_terminated(run_id)
    return run_id, network


def test_register_is_idempotent_and_tags_lineage(store, tmp_path):
    run_id, _ = finished_run(store, tmp_path)
    version = registry.register(run_id, "derain", uri=store)
    assert registry.register(run_id, "derain", uri=store).version == version.version
    client = registry.client_for(store)
    assert len(client.search_model_versions("name = 'derain'")) == 1
    assert version.tags["run_id"] == run_id and version.tags["task"] == "deraining"
    assert version.tags["val.psnr"] == "30.5000" and version.tags["conv_gmacs"] == "1.250"
    assert "# derain v1" in version.description and "restorch restore --model models:/derain/1" in version.description


def test_register_and_load_leave_the_process_mlflow_uris_alone(store, tmp_path, monkeypatch):
    """register/load set MLflow's process-wide URIs only while they run: afterwards a client of another
    store reaches that store's registry, not this one's (as in a long-lived service or a test session)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    run_id, _ = finished_run(store, tmp_path)
    registry.register(run_id, "derain", uri=store)
    registry.load_network("derain/1", store)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    other = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(other).create_registered_model("elsewhere")
    assert [model.name for model in MlflowClient(other).search_registered_models()] == ["elsewhere"]
    assert [model.name for model in MlflowClient(store).search_registered_models()] == ["derain"]


def test_register_refuses_runs_without_model_or_metrics(store, tmp_path):
    no_model, _ = finished_run(store, tmp_path, with_model=False)
    with pytest.raises(registry.RegistryError, match="no model/model.pt artifact"):
        registry.register(no_model, "derain", uri=store)
    no_metrics, _ = finished_run(store, tmp_path, metrics={})
    with pytest.raises(registry.RegistryError, match="no metric 'psnr'"):
        registry.register(no_metrics, "derain", uri=store)
    with pytest.raises(registry.RegistryError, match="no run id or sweep called 'nothing'"):
        registry.register("nothing", "derain", uri=store)


def test_unknown_model_alias_version_list_what_exists(store, tmp_path, capsys):
    run_id, _ = finished_run(store, tmp_path)
    registry.register(run_id, "derain", uri=store)
    assert main(["registry", "promote", "derain", "1", "--alias", "champion", "--tracking-uri", store]) == 0
    for reference, message in [("models:/nope@champion", "no registered model 'nope'; registered models: derain"),
                               ("models:/derain@prod", "no alias @prod; aliases: @champion (v1)"),
                               ("models:/derain/7", "no version 7; versions: 1")]:
        with pytest.raises(registry.RegistryError, match=message.replace("(", r"\(").replace(")", r"\)")):
            registry.load_network(reference, store)
    assert main(["registry", "show", "derain@champion", "--tracking-uri", store]) == 0
    assert "derain v1 @champion" in capsys.readouterr().out


def test_registered_model_loads_in_a_fresh_process_without_ray_or_deepspeed(store, tmp_path):
    run_id, network = finished_run(store, tmp_path)
    registry.register(run_id, "derain", uri=store)
    image = np.random.default_rng(0).random((2, 3, 21, 30), dtype=np.float32)
    np.save(tmp_path / "batch.npy", image)
    script = (
        "import sys, numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({store!r}); mlflow.set_registry_uri({store!r})\n"
        "model = mlflow.pyfunc.load_model('models:/derain/1')\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, model.predict(np.load({str(tmp_path / 'batch.npy')!r})))\n"
        "assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules, 'ray/deepspeed imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    with torch.no_grad():
        expected = network(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def test_restore_keeps_bit_depth_and_any_size(store, tmp_path):
    run_id, network = finished_run(store, tmp_path)
    registry.register(run_id, "derain", uri=store)
    registry.promote(registry.client_for(store), "derain", "1", "champion")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    write_image(folder / "deep.png", rng.random((37, 29, 3)), bit_depth=16)
    write_image(folder / "plain.jpg", rng.random((20, 44, 3)))
    assert main(["restore", "--model", "models:/derain@champion", "--input", str(folder), "--output",
                 str(tmp_path / "out"), "--tracking-uri", store]) == 0
    assert image_bit_depth(tmp_path / "out" / "deep.png") == 16
    restored = read_image(tmp_path / "out" / "deep.png")
    assert restored.shape == (37, 29, 3)
    with torch.no_grad():
        expected = network(torch.from_numpy(read_image(folder / "deep.png").transpose(2, 0, 1).copy())[None])
    np.testing.assert_allclose(restored, expected[0].numpy().transpose(1, 2, 0).clip(0, 1), atol=1 / 65535)
    assert read_image(tmp_path / "out" / "plain.jpg").shape == (20, 44, 3)
