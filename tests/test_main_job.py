"""The main job end to end, as a user runs it, in the fast suite: `restorch sweep spec.yaml` (a
2-trial grid of a tiny model: embedded Ray, Tune, a Ray Train + DeepSpeed job per trial, the
embedded MLflow store in the working directory), then `restorch register` of the best trial and
`restorch restore` with the registered version."""
from __future__ import annotations

import csv
import os
import subprocess

import numpy as np
import torch
import yaml
from conftest import sweep_runs, tiny_spec
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.cli import main
from workloads.files import read_image, write_image
from workloads.inference import restore
from workloads.train import load_consolidated

NAME = "main-job"


def test_sweep_tracks_registers_and_restores_the_best_trial(derain_data, tmp_path, monkeypatch, capsys):
    raw = tiny_spec(NAME, derain_data, {"train.lr": {"grid": [2e-3, 8e-3]}},
                    train={"iterations": 4, "val_every": 2, "checkpoint_every": 2, "log_every": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    sweep = subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]

    with open(tmp_path / "restorch_runs" / NAME / "results.csv") as results:
        rows = list(csv.DictReader(results))  # best first
    assert [row["status"] for row in rows] == ["finished", "finished"]
    assert sorted(float(row["train.lr"]) for row in rows) == [2e-3, 8e-3]

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    parent, children = sweep_runs(client, NAME)
    assert parent.info.status == "FINISHED"
    assert {"spec.yaml", "results.csv", "best_spec.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert set(children) == {row["trial"] for row in rows}
    for row in rows:
        run = children[row["trial"]]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == float(row["train.lr"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "psnr")] == [2, 4]
        assert run.data.metrics["psnr"] == float(row["psnr"])
    best_run = children[rows[0]["trial"]]

    monkeypatch.chdir(tmp_path)  # the user's working directory: its mlflow.db is the default store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["register", NAME, "--name", "derain-tiny"]) == 0
    assert f"from run {best_run.info.run_id}" in capsys.readouterr().out

    photo = np.random.default_rng(0).random((29, 42, 3))
    write_image(tmp_path / "photo.png", photo, bit_depth=16)
    assert main(["restore", "--model", "models:/derain-tiny/1", "--input", "photo.png", "--output", "restored.png"]) == 0
    trial_model = load_consolidated(client.download_artifacts(best_run.info.run_id, "model/model.pt", str(tmp_path)))
    image = torch.from_numpy(read_image(tmp_path / "photo.png").transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        expected = restore(trial_model.eval(), image)[0].numpy().transpose(1, 2, 0).clip(0, 1)
    np.testing.assert_allclose(read_image(tmp_path / "restored.png"), expected, atol=1 / 65535)
