"""The model registry on runs made the way users make them: a tiny sweep (`restorch sweep`) and a tiny
`restorch train` job, both in one working directory and its default MLflow store; registering, cards,
compare, aliases, errors, loading, restoring and evaluating with a version."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RESTORMER, sweep_runs, tiny_spec
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.tracking import model_registry
from orchestrator.cli import main
from orchestrator.tracking.keys import CONV_GMACS, MODEL_ARTIFACT, PARAMS_M, RECORD_ARTIFACTS
from workloads.files import image_bit_depth, read_image, write_image
from workloads.train import load_consolidated

pytestmark = pytest.mark.slow  # one tiny sweep and one tiny training job for the module


@dataclass
class Store:
    folder: Path
    uri: str
    trials: dict[str, str]  # kv_reduction -> the trial's run id
    job: str  # the `restorch train` run's id

    def network(self, run_id: str, folder: Path) -> torch.nn.Module:
        return load_consolidated(MlflowClient(self.uri).download_artifacts(run_id, MODEL_ARTIFACT, str(folder)))


def restorch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([str(BIN / "restorch"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def store(tmp_path_factory, derain_data) -> Store:
    """A sweep over GLMHA's K/V reduction (`regsweep`, 2 trials) and a `restorch train` job (`job`), run by
    the CLI in one folder: their runs are in its default store, sqlite:///FOLDER/mlflow.db."""
    folder = tmp_path_factory.mktemp("registry")
    sweep = tiny_spec("regsweep", derain_data, {"model.glmha.kv_reduction": {"grid": [0.25, 0.5]}})
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    job = {"name": "job", "model": TINY_RESTORMER, "task": "deraining",
           "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32, "batch_size": 2},
           "train": {"iterations": 4, "val_every": 2, "checkpoint_every": 2, "log_every": 2}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    restorch("sweep", "sweep.yaml", cwd=folder)
    trained = restorch("train", "job.yaml", cwd=folder)
    job_run = re.search(r"MLflow run ([0-9a-f]{32})", trained.stdout)[1]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    _, children = sweep_runs(MlflowClient(uri), "regsweep")
    trials = {run.data.params["model.glmha.kv_reduction"]: run.info.run_id for run in children.values()}
    return Store(folder, uri, trials, job_run)


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_card_of_a_sweep_model_says_what_the_trial_logged(store, workdir, capsys):
    version = model_registry.register("regsweep", "card-sweep", uri=store.uri)
    run = MlflowClient(store.uri).get_run(version.run_id)
    assert version.run_id in store.trials.values()
    assert version.tags["params_m"] == f"{run.data.metrics[PARAMS_M]:.3f}"
    assert version.tags["conv_gmacs"] == f"{run.data.metrics[CONV_GMACS]:.3f}"
    assert version.tags["protocol_version"] == "1" and version.tags["protocol"].startswith("PSNR/SSIM on Y")
    assert version.tags["data"] == str(Path(run.data.params["data.val"]))
    assert version.tags["val.psnr"] == f"{run.data.metrics['psnr']:.4f}"
    card = version.description
    assert f"params: {version.tags['params_m']} M" in card and f"conv GMACs at 256x256: {version.tags['conv_gmacs']}" in card
    assert "Metric protocol v1: PSNR/SSIM on Y" in card and f"Data: {version.tags['data']}" in card
    kv_reduction = run.data.params["model.glmha.kv_reduction"]
    # the trial's full model options: the searched one, and GLMHA's defaults the spec never wrote
    assert f"- `glmha.kv_reduction`: {kv_reduction}" in card and "- `glmha.alpha`: 0.6" in card
    assert "- `glmha.pool_size`: 8" in card and "- `ffn_expansion_factor`: 2.66" in card

    assert main(["registry", "list", "--tracking-uri", store.uri]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("card-sweep v1")]
    assert listed and listed[0].endswith(f"params {version.tags['params_m']} M")
    assert main(["registry", "show", "card-sweep/1", "--tracking-uri", store.uri]) == 0
    shown = capsys.readouterr().out
    assert f"params: {version.tags['params_m']} M" in shown and "params: ? M" not in shown


def _reproduce_command(card: str) -> str:
    return card.split("## Reproduce\n```\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.parametrize("source", ["sweep", "job"])
def test_the_reproduce_command_runs_as_printed_from_an_empty_folder(store, source, tmp_path):
    """The card's command, run by a shell in an empty folder, fetches a spec that validates (`restorch
    spec check` stands in for `restorch train`: the same file, no training)."""
    run_id = store.trials["0.25"] if source == "sweep" else store.job
    version = model_registry.register(run_id, f"repro-{source}", uri=store.uri)
    command = _reproduce_command(version.description)
    download, train = command.split(" && ")
    assert train.startswith("restorch train ")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    checked = subprocess.run(f"{download} && {train.replace('restorch train ', 'restorch spec check ', 1)}", shell=True,
                             cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "valid" in checked.stdout
    spec = yaml.safe_load((empty / train.removeprefix("restorch train ")).read_text())
    if source == "sweep":
        assert spec["model"]["glmha"]["kv_reduction"] == 0.25 and "search" not in spec
    assert spec["name"] != ("regsweep" if source == "sweep" else "job")  # not the stored run: that would only resume


def test_compare_shows_the_options_and_metrics_that_differ(store, capsys):
    for kv_reduction in ("0.25", "0.5"):
        model_registry.register(store.trials[kv_reduction], "compared", uri=store.uri)
    assert main(["registry", "compare", "compared", "1", "2", "--tracking-uri", store.uri]) == 0
    rows = {key: values for key, *values in (re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines())}
    assert rows["model option glmha.kv_reduction"] == ["0.25", "0.5"]
    assert "metric conv_gmacs" in rows and "tag conv_gmacs" in rows  # K/V reduction changes the cost
    assert not any(key.startswith("model option") and key != "model option glmha.kv_reduction" for key in rows)


def test_register_is_idempotent_and_tags_lineage(store):
    version = model_registry.register(store.job, "derain", uri=store.uri)
    assert model_registry.register(store.job, "derain", uri=store.uri).version == version.version
    client = model_registry.client_for(store.uri)
    assert len(client.search_model_versions("name = 'derain'")) == 1
    assert version.tags["run_id"] == store.job and version.tags["task"] == "deraining"
    assert "# derain v1" in version.description and "restorch restore --model models:/derain/1" in version.description


def test_register_and_load_leave_the_process_mlflow_uris_alone(store, tmp_path, monkeypatch):
    """register/load set MLflow's process-wide URIs only while they run: afterwards a client of another
    store reaches that store's registry, not this one's (as in a long-lived service or a test session)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    model_registry.register(store.job, "uris", uri=store.uri)
    model_registry.load_network("uris/1", store.uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    other = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(other).create_registered_model("elsewhere")
    assert [model.name for model in MlflowClient(other).search_registered_models()] == ["elsewhere"]
    assert "uris" in [model.name for model in MlflowClient(store.uri).search_registered_models()]


def test_evaluation_runs_store_where_the_store_does_and_join_the_card(store, workdir, derain_data, capsys):
    """`evaluate --model` from another folder: its run's artifacts go beside the store's others (no stray
    ./mlruns), it records what its numbers are of, and the version's card lists it; `register` of an
    unknown name then suggests the sweep and the runs holding a model, not the evaluation run."""
    model_registry.register(store.job, "evaluated", uri=store.uri)
    assert main(["evaluate", "--model", "models:/evaluated/1", "--data", str(derain_data / "val"), "--task", "deraining",
                 "--tracking-uri", store.uri]) == 0
    run_id = re.search(r"logged to MLflow run ([0-9a-f]{32})", capsys.readouterr().out)[1]
    assert not (workdir / "mlruns").exists()
    client = MlflowClient(store.uri)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith((store.folder / "mlartifacts").as_uri())
    assert [a.path for a in client.list_artifacts(run_id)] == ["evaluation.json", RECORD_ARTIFACTS]
    trained = client.get_run(store.job)
    assert run.data.metrics[PARAMS_M] == trained.data.metrics[PARAMS_M]
    assert run.data.params["model.dim"] == trained.data.params["model.dim"]
    assert run.data.tags["restorch.protocol_version"] == "1" and run.data.tags["restorch.data"] == str(derain_data / "val")
    card = model_registry.get_version(client, model_registry.ModelReference("evaluated", version="1")).description
    assert "## Evaluations" in card and f"- {derain_data / 'val'}: psnr " in card and run_id in card
    # the trained run's reproducibility record: the seed, data digests and resources its job logged, the checkpoint
    assert "- seed: 100" in card and "- data digests: data.train listing-1:" in card and "1 worker(s) on cpu" in card
    assert "- metrics from checkpoint: last, iteration 4" in card

    with pytest.raises(model_registry.RegistryError) as refused:
        model_registry.register("nothing", "derain", uri=store.uri)
    message = str(refused.value)
    assert "no run id or sweep called 'nothing'" in message and "sweeps: regsweep;" in message
    assert f"{store.job} (job)" in message and run.info.run_name not in message


def test_register_refuses_runs_without_model_or_metric(store, derain_data, capsys):
    model_registry.register(store.job, "refusals", uri=store.uri)
    assert main(["evaluate", "--model", "models:/refusals/1", "--data", str(derain_data / "val"), "--task", "deraining",
                 "--tracking-uri", store.uri]) == 0
    evaluation = re.search(r"logged to MLflow run ([0-9a-f]{32})", capsys.readouterr().out)[1]
    with pytest.raises(model_registry.RegistryError, match="no model/model.pt artifact"):
        model_registry.register(evaluation, "derain", uri=store.uri)
    with pytest.raises(model_registry.RegistryError, match="no metric 'mrae'"):
        model_registry.register(store.job, "by-mrae", metric="mrae", uri=store.uri)


def test_unknown_model_alias_version_list_what_exists(store, capsys):
    model_registry.register(store.job, "aliased", uri=store.uri)
    assert main(["registry", "promote", "aliased", "1", "--alias", "champion", "--tracking-uri", store.uri]) == 0
    for reference, message in [("models:/nope@champion", "no registered model 'nope'; registered models: "),
                               ("models:/aliased@prod", "no alias @prod; aliases: @champion (v1)"),
                               ("models:/aliased/7", "no version 7; versions: 1")]:
        with pytest.raises(model_registry.RegistryError, match=re.escape(message)):
            model_registry.load_network(reference, store.uri)
    assert main(["registry", "show", "aliased@champion", "--tracking-uri", store.uri]) == 0
    assert "aliased v1 @champion" in capsys.readouterr().out


def test_registered_model_loads_in_a_fresh_process_without_ray_or_deepspeed(store, tmp_path):
    model_registry.register(store.job, "fresh", uri=store.uri)
    image = np.random.default_rng(0).random((2, 3, 21, 30), dtype=np.float32)
    np.save(tmp_path / "batch.npy", image)
    script = (
        "import sys, numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri({store.uri!r}); mlflow.set_registry_uri({store.uri!r})\n"
        "model = mlflow.pyfunc.load_model('models:/fresh/1')\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, model.predict(np.load({str(tmp_path / 'batch.npy')!r})))\n"
        "assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules, 'ray/deepspeed imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    with torch.no_grad():
        expected = store.network(store.job, tmp_path)(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def test_restore_keeps_bit_depth_and_any_size(store, tmp_path):
    model_registry.register(store.job, "restoring", uri=store.uri)
    model_registry.promote(model_registry.client_for(store.uri), "restoring", "1", "champion")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    write_image(folder / "deep.png", rng.random((37, 29, 3)), bit_depth=16)
    write_image(folder / "plain.jpg", rng.random((20, 44, 3)))
    assert main(["restore", "--model", "models:/restoring@champion", "--input", str(folder), "--output",
                 str(tmp_path / "out"), "--tracking-uri", store.uri]) == 0
    assert image_bit_depth(tmp_path / "out" / "deep.png") == 16
    restored = read_image(tmp_path / "out" / "deep.png")
    assert restored.shape == (37, 29, 3)
    network = store.network(store.job, tmp_path)
    with torch.no_grad():
        expected = network(torch.from_numpy(read_image(folder / "deep.png").transpose(2, 0, 1).copy())[None])
    np.testing.assert_allclose(restored, expected[0].numpy().transpose(1, 2, 0).clip(0, 1), atol=1 / 65535)
    assert read_image(tmp_path / "out" / "plain.jpg").shape == (20, 44, 3)
