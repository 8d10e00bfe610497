"""Sweeps end to end on the CPU: real Ray (one instance for the module, as a cluster would be), real
Tune, real Ray Train + DeepSpeed jobs, real MLflow (embedded SQLite, and a real `mlflow server`).
Tiny models and data keep each trial to Ray Train's fixed start-up plus a few seconds."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import sweep_runs, tiny_spec
from mlflow.tracking import MlflowClient
from servers import BIN, answers, free_port, started, wait_for

from orchestrator.tracking import model_registry
from orchestrator.cli import main
from orchestrator.run.jobs import init_ray
from orchestrator.spec.load import parse_spec
from orchestrator.run.sweep import TRIAL_RESOURCE, run_sweep
from orchestrator.tracking.keys import EXPLOIT_TAG, STOPPED_AT_TAG, STOPPED_BY_TAG, TRIAL_TAG
from orchestrator.run.status import sweep_trials
from workloads.files import read_image, write_image
from workloads.inference import restore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a shared, loaded machine: Ray Train start-up varies
RESTORCH = str(BIN / "restorch")


@pytest.fixture(scope="module")
def ray_address() -> str:
    """One local Ray for the module, with two sweep trial slots (the resource sweeps reserve)."""
    import ray

    init_ray(None, local_resources={TRIAL_RESOURCE: 2})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The working directory of the sweep: the embedded MLflow store lands here unless a URI is given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def mlflow_server(tmp_path) -> str:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store (one worker, no job execution),
    stopped after the test."""
    folder = tmp_path / "server"
    folder.mkdir()
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{port}"
    with started(command, env=env, log=folder / "server.log", marker=str(folder)) as process:
        wait_for(lambda: answers(f"{uri}/health"), timeout=120, what="mlflow server", process=process, log=folder / "server.log")
        yield uri


def test_grid_sweep_on_a_remote_tracking_server(ray_address, derain_data, workdir, mlflow_server, capsys):
    """4-trial grid: the server holds 1 parent + 4 children (logged by the trials' rank-0 workers)
    with params, metric history, profiler numbers and the final model, all FINISHED; the results
    table matches MLflow; nothing was tracked locally."""
    from workloads.train import load_consolidated

    raw = tiny_spec("grid", derain_data, {"model.glmha.alpha": {"grid": [0.4, 0.6]}, "model.glmha.kv_reduction": {"grid": [0.25, 0.5]}},
                    tracking={"uri": mlflow_server, "experiment": "grid-remote"})
    outcome = run_sweep(parse_spec(raw))

    assert outcome.errors == 0 and len(outcome.rows) == 4
    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(client, "grid-remote")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.model.glmha.alpha"] == "grid [0.4, 0.6]"
    assert {"spec.yaml", "results.csv", "best_spec.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["version.ray"] and parent.data.tags["host"]
    assert set(children) == {row["trial"] for row in outcome.rows}
    for row in outcome.rows:
        run = children[row["trial"]]
        assert run.info.status == "FINISHED" and row["status"] == "finished"
        assert float(run.data.params["model.glmha.alpha"]) == row["model.glmha.alpha"]
        assert float(run.data.params["model.glmha.kv_reduction"]) == row["model.glmha.kv_reduction"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "psnr")] == [3, 6]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 3, 6]  # and the first iteration
        for name in ("psnr", "ssim", "params_m", "conv_gmacs"):
            assert run.data.metrics[name] == pytest.approx(row[name]), name
        assert run.data.tags["restorch.checkpoint"].endswith("checkpoint_0000006")
    assert len({row["conv_gmacs"] for row in outcome.rows}) == 2  # K/V reduction changes the cost
    best = outcome.rows[0]
    model_file = client.download_artifacts(children[best["trial"]].info.run_id, "model/model.pt", str(workdir))
    restored = load_consolidated(model_file)(torch.rand(1, 3, 24, 40))
    assert restored.shape == (1, 3, 24, 40)
    assert not (workdir / "mlruns").exists() and not (workdir / "mlflow.db").exists()

    capsys.readouterr()
    assert main(["status", "grid", "--storage", outcome.spec.storage.path]) == 0
    assert capsys.readouterr().out.count("FINISHED") == 4

    # Registry, end to end: register the sweep's best trial, promote it, restore an image with it.
    server = ["--tracking-uri", mlflow_server]
    assert main(["register", "grid", "--name", "derain-glmha", *server]) == 0
    assert main(["registry", "promote", "derain-glmha", "1", "--alias", "champion", *server]) == 0
    network, version = model_registry.load_network("models:/derain-glmha@champion", mlflow_server)
    assert version.tags["run_id"] == children[best["trial"]].info.run_id
    trial_model = load_consolidated(model_file).eval()
    photo = np.random.default_rng(3).random((37, 50, 3))
    write_image(workdir / "photo.png", photo, bit_depth=16)
    image = torch.from_numpy(read_image(workdir / "photo.png").transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        expected = restore(trial_model, image)
        torch.testing.assert_close(restore(network, image), expected, atol=1e-5, rtol=0)
    assert main(["restore", "--model", "models:/derain-glmha@champion", "--input", str(workdir / "photo.png"),
                 "--output", str(workdir / "restored.png"), *server]) == 0
    restored = read_image(workdir / "restored.png")  # 16-bit in, 16-bit out: off by at most the quantisation step
    np.testing.assert_allclose(restored, expected[0].numpy().transpose(1, 2, 0).clip(0, 1), atol=1 / 65535)


@pytest.mark.parametrize("trial_mode", ["inline", "job"])
def test_asha_stops_the_hopeless_trials_early(ray_address, derain_data, workdir, trial_mode):
    """Grid over GLMHA's alpha x lr in which lr 1.0 is hopeless: ASHA stops both such trials at its
    first rung, long before the iteration budget; the embedded MLflow marks them FINISHED, stopped by asha
    at that iteration, and `restorch status` says so. Tune's grid
    varies its alphabetically first key fastest, so both good trials run (and set the rungs' bars)
    before the hopeless ones start: asynchronous ASHA never stops the first trial at a rung."""
    raw = tiny_spec("asha", derain_data, {"model.glmha.alpha": {"grid": [0.4, 0.6]}, "train.lr": {"grid": [2e-3, 1.0]}},
                    train={"iterations": 12}, search={"scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
                    resources={"trial_mode": trial_mode})
    outcome = run_sweep(parse_spec(raw))

    by_lr = {lr: [row for row in outcome.rows if row["train.lr"] == lr] for lr in (2e-3, 1.0)}
    assert all(row["iteration"] < 12 for row in by_lr[1.0]), outcome.report()
    assert any(row["status"] == "finished" for row in by_lr[2e-3]), outcome.report()
    _, children = sweep_runs(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), "asha")
    states = {row["trial"]: row["mlflow"] for row in sweep_trials(outcome.path)[1]}
    for row in by_lr[1.0]:
        run = children[row["trial"]]
        assert run.info.status == "FINISHED" and run.data.tags[STOPPED_BY_TAG] == "asha"
        assert run.data.tags[STOPPED_AT_TAG] == str(row["iteration"])
        assert states[row["trial"]] == f"stopped at {row['iteration']} (asha)"
    assert (workdir / "mlartifacts").is_dir()


def _steps_logged_once(client: MlflowClient, run: Any, metric: str, last: int) -> list[float]:
    """A run's `metric` history: each of steps 1..last logged once (a resumed attempt replaced the old run's
    history after its checkpoint); returns the run's `resumed_from` values."""
    history = client.get_metric_history(run.info.run_id, metric)
    assert sorted(m.step for m in history) == list(range(1, last + 1)), history
    return [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from")]


@pytest.mark.parametrize("trial_mode", ["inline", "job"])
def test_hyperband_pauses_trials_and_continues_the_best(ray_address, derain_data, workdir, trial_mode):
    """Synchronous HyperBand over 6 lr values, 4 iterations, halving by 2: its first bracket (3 trials) runs
    to the end; the next 3 trials (one with a hopeless lr) share a bracket whose rung is iteration 2. The
    first to reach it (two run at once) is paused (its trial process ends) until the last one does; then the
    hopeless one is stopped and the two others go on, a paused one from its checkpoint at iteration 2. Each step
    is logged once, and a trial that ran its 4 iterations is FINISHED, not "stopped" (HyperBand stops it on
    its last report)."""
    lrs = [2e-3, 3e-3, 1e-3, 2.5e-3, 1.5e-3, 1.0]  # a one-key grid runs in this order
    raw = tiny_spec("hyperband", derain_data, {"train.lr": {"grid": lrs}},
                    train={"iterations": 4, "val_every": 1, "checkpoint_every": 1, "log_every": 1},
                    search={"scheduler": "hyperband", "reduction_factor": 2}, resources={"trial_mode": trial_mode})
    outcome = run_sweep(parse_spec(raw))

    assert outcome.errors == 0, outcome.report()
    by_lr = {row["train.lr"]: row for row in outcome.rows}
    assert [by_lr[lr]["iteration"] for lr in lrs] == [4, 4, 4, 4, 4, 2], outcome.report()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    _, children = sweep_runs(client, "hyperband")
    stopped = children[by_lr[1.0]["trial"]]
    assert stopped.info.status == "FINISHED" and stopped.data.tags[STOPPED_BY_TAG] == "hyperband"
    assert stopped.data.tags[STOPPED_AT_TAG] == "2"
    resumed = {}
    for lr in lrs[:5]:
        run = client.get_run(children[by_lr[lr]["trial"]].info.run_id)
        assert run.info.status == "FINISHED" and STOPPED_BY_TAG not in run.data.tags, run.data.tags
        resumed[lr] = _steps_logged_once(client, run, "loss", 4)
    assert all(set(resumed[lr]) == {0.0} for lr in lrs[:3]), resumed  # the first bracket runs straight through
    # the first of the bracket to reach its rung waits there for the others: paused, then resumed from there
    assert any(set(resumed[lr]) == {0.0, 2.0} for lr in lrs[3:5]), resumed


@pytest.mark.parametrize("trial_mode", ["inline", "job"])
def test_pbt_continues_the_hopeless_trial_from_the_good_one(ray_address, derain_data, workdir, trial_mode):
    """pbt over a grid of lr in which 1.0 is hopeless, perturbing every 3 of 9 iterations (synch: both
    trials are compared at each interval): the lr-1.0 trial continues from the good trial's checkpoint
    at iteration 3, as a new job, with a mutated lr that the optimizer then uses; both trials run to the
    end; MLflow holds one child run per trial, with the exploitation as a tag and the lr history as a
    metric; the results show each trial's last lr."""
    from workloads.schedule import lr_factor

    mutations = {"train.lr": {"loguniform": [1e-3, 1e-2]}, "train.weight_decay": [0.0, 1e-4]}
    raw = tiny_spec("pbt", derain_data, {"train.lr": {"grid": [2e-3, 1.0]}}, train={"iterations": 9},
                    search={"scheduler": "pbt", "perturbation_interval": 3, "hyperparam_mutations": mutations,
                            "synch": True}, resources={"trial_mode": trial_mode})
    outcome = run_sweep(parse_spec(raw))

    assert outcome.errors == 0 and [row["status"] for row in outcome.rows] == ["finished"] * 2, outcome.report()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    _, children = sweep_runs(client, "pbt")
    assert set(children) == {row["trial"] for row in outcome.rows}
    first_lr = {float(run.data.params["train.lr"]): trial for trial, run in children.items()}  # params: the initial values
    good, hopeless = first_lr[2e-3], first_lr[1.0]
    run = children[hopeless]
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{EXPLOIT_TAG}.{hopeless}-g1"].startswith(f"iteration 3 from trial {good}: train.lr="), \
        run.data.tags
    lr_history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.lr")]
    assert lr_history[0] == (0, 1.0) and lr_history[1][0] == 3, lr_history
    new_lr = lr_history[1][1]
    assert 1e-3 * 0.8 <= new_lr <= 1e-2 * 1.2, lr_history  # the good trial's 2e-3 scaled, or drawn from the range
    assert 3 in {m.value for m in client.get_metric_history(run.info.run_id, "resumed_from")}
    step, used = next((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lr") if m.step > 3)
    assert used == pytest.approx(new_lr * lr_factor(step - 1, total=9, base_lr=new_lr, min_lr=1e-6), rel=1e-6)
    assert (workdir / f"restorch_runs/pbt/jobs/{hopeless}-g1/checkpoint_0000006").is_dir()
    for row in outcome.rows:  # the last values, as the MLflow history ends
        history = client.get_metric_history(children[row["trial"]].info.run_id, "train.lr")
        assert row["train.lr"] == pytest.approx(max(history, key=lambda m: m.step).value)
        assert row["train.weight_decay"] in (0.0, 1e-4) and row["iteration"] == 9


def test_optuna_tpe_and_multi_objective_search(ray_address, derain_data, workdir):
    """TPE samples trials from ranges; multi-objective TPE over psnr (max) and conv GMACs (min)
    yields a Pareto set of trials no other trial beats on both."""
    space = {"model.glmha.alpha": {"uniform": [0.2, 0.8]}, "model.glmha.kv_reduction": {"choice": [0.25, 0.5, 0.75]}}
    tpe = run_sweep(parse_spec(tiny_spec("tpe", derain_data, space, search={"algorithm": "optuna", "num_samples": 2})))
    assert tpe.errors == 0 and len(tpe.rows) == 2
    assert all(0.2 <= row["model.glmha.alpha"] <= 0.8 and row["psnr"] is not None for row in tpe.rows)

    objectives = {"psnr": "max", "conv_gmacs": "min"}
    multi = run_sweep(parse_spec(tiny_spec("pareto", derain_data, space, train={"iterations": 3},
                                           search={"algorithm": "optuna_multi", "objectives": objectives, "num_samples": 2})))
    assert multi.errors == 0 and len(multi.rows) == 2
    assert 1 <= len(multi.pareto) <= 2
    for row in multi.rows:
        dominated = any(o["psnr"] >= row["psnr"] and o["conv_gmacs"] <= row["conv_gmacs"]
                        and (o["psnr"], o["conv_gmacs"]) != (row["psnr"], row["conv_gmacs"]) for o in multi.rows)
        assert (row in multi.pareto) == (not dominated)
    assert "Pareto set over psnr (max), conv_gmacs (min)" in multi.report()
    _, children = sweep_runs(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), "pareto")
    assert len(children) == 2


def _child_progress(client: MlflowClient) -> dict[str, tuple[str, int]]:
    """trial id -> (MLflow status, last logged iteration), read while the sweep runs."""
    experiment = client.get_experiment_by_name("resume")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` != ''")
    return {run.data.tags[TRIAL_TAG]: (run.info.status, int(run.data.metrics.get("iteration", 0))) for run in runs}


@pytest.mark.timeout(2400)
def test_resume_after_the_driver_is_killed(ray_address, derain_data, workdir, mlflow_server):
    """The sweep driver (`restorch sweep` on the running cluster) is SIGKILLed once a trial has
    finished and another is training; `restorch sweep --resume` completes the sweep: each trial
    once in the results and in MLflow, finished trials not re-run, interrupted ones resumed from
    their last checkpoint. (On a cluster: storage a folder the nodes share, tracking on a server.)"""
    raw = tiny_spec("resume", derain_data, {"model.glmha.alpha": {"grid": [0.3, 0.5, 0.7]}}, train={"iterations": 30},
                    storage={"path": str(workdir / "restorch_runs"), "shared": True}, tracking={"uri": mlflow_server})
    spec_file = workdir / "resume.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    client = MlflowClient(mlflow_server)
    log = open(workdir / "driver.log", "w")
    driver = subprocess.Popen([RESTORCH, "sweep", str(spec_file)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while True:
        progress = _child_progress(client)
        states = sorted(progress.values())
        # a checkpoint every 3 iterations: at 9, the one at 3 (at least) is safely in storage; by 21 (what MLflow
        # has lags the training) the trial is still far from its end when the kill comes
        if any(s == "FINISHED" for s, _ in states) and any(s == "RUNNING" and 9 <= i <= 21 for s, i in states):
            break
        assert driver.poll() is None, (workdir / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no point to interrupt the sweep at: {progress}"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_before = {trial for trial, (status, _) in progress.items() if status == "FINISHED"}
    history_before = {trial: len(client.get_metric_history(run.info.run_id, "iteration"))
                      for trial, run in sweep_runs(client, "resume")[1].items() if trial in finished_before}

    resumed = subprocess.run([RESTORCH, "sweep", "--resume", "resume"], cwd=workdir, env=env, capture_output=True,
                             text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep resume" in resumed.stdout

    with open(workdir / "restorch_runs/resume/results.csv") as results:
        rows = list(csv.DictReader(results))
    assert sorted(row["status"] for row in rows) == ["finished"] * 3
    assert len({row["trial"] for row in rows}) == 3
    parent, children = sweep_runs(client, "resume")
    assert set(children) == {row["trial"] for row in rows} and parent.info.status == "FINISHED"
    for trial, run in children.items():
        assert run.info.status == "FINISHED"
        if trial in finished_before:  # not re-run: its history is what it was at the kill
            assert len(client.get_metric_history(run.info.run_id, "iteration")) == history_before[trial]
    interrupted = [run for trial, run in children.items() if progress.get(trial, ("", 0))[0] == "RUNNING"]
    assert interrupted
    for run in interrupted:  # continued from a checkpoint, not from scratch, each step logged once
        assert max(m.value for m in client.get_metric_history(run.info.run_id, "resumed_from")) >= 3
        for key in ("iteration", "loss", "psnr"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, sorted(steps))

    # The same spec again: the finished sweep is found in storage and nothing runs again.
    again = subprocess.run([RESTORCH, "sweep", str(spec_file)], cwd=workdir, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "resuming sweep resume" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert set(sweep_runs(client, "resume")[1]) == set(children)
    for trial, run in sweep_runs(client, "resume")[1].items():
        assert len(client.get_metric_history(run.info.run_id, "iteration")) == \
            len(client.get_metric_history(children[trial].info.run_id, "iteration"))
