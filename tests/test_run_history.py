"""One clean metric history per run: a sweep trial whose worker crashes after a checkpoint re-runs the
iterations after it, and its MLflow run then holds each step once, the re-run's values (the attempt that
died is a deleted run pointing at it), with the final values where the results table and the registry
read them."""
from __future__ import annotations

import csv
import os
import subprocess

import pytest
import yaml
from conftest import sweep_runs, tiny_spec
from faults import crash_env
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.tracking import model_registry
from orchestrator.run.jobs import TEST_HOOK_ENV
from orchestrator.run.timeline import TIMELINE_ENV
from orchestrator.tracking.keys import ATTEMPT_TAG, REPLACED_BY_TAG, REPLACES_TAG

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("trial_mode", ["inline", "job"])
def test_a_trial_whose_worker_crashed_logs_each_step_once(derain_data, tmp_path, trial_mode):
    """Retried by Tune (an inline trial) or by Ray Train (a job trial), from the same checkpoint."""
    raw = tiny_spec("crash", derain_data, {"model.glmha.alpha": {"grid": [0.5]}},
                    train={"iterations": 8, "val_every": 3, "checkpoint_every": 3, "log_every": 1},
                    resources={"trial_mode": trial_mode})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    marker = tmp_path / "crashed"
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # rank 0 fails at iteration 5, once: iterations 1-4 are logged, the checkpoint at 3 is the last one
    env[TEST_HOOK_ENV] = crash_env(0, 5, marker)
    env[TIMELINE_ENV] = str(tmp_path / "timeline.txt")
    done = subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert marker.exists()  # the worker crashed
    pids = {phase: {pid for _, pid, name in map(str.split, (tmp_path / "timeline.txt").read_text().splitlines())
                    if name == phase} for phase in ("trial_started", "worker_started")}
    if trial_mode == "inline":  # each attempt trains in its trial's process
        assert len(pids["worker_started"]) == 2 and pids["worker_started"] <= pids["trial_started"], pids
    else:  # in the workers of a Ray Train job
        assert len(pids["worker_started"]) == 2 and not pids["worker_started"] & pids["trial_started"], pids

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    _, children = sweep_runs(client, "crash")
    (run,) = children.values()
    assert run.info.status == "FINISHED"
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    for key, metrics in history.items():
        steps = [metric.step for metric in metrics]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    assert sorted(m.step for m in history["iteration"]) == list(range(1, 9))
    assert sorted(m.step for m in history["psnr"]) == [3, 6, 8]
    resumed_from = {m.step: m.value for m in history["resumed_from"]}
    assert [resumed_from[step] for step in range(1, 9)] == [0, 0, 0, 3, 3, 3, 3, 3]  # 4 is the re-run's
    assert run.data.tags[ATTEMPT_TAG] == "2"

    deleted = client.search_runs([run.info.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert [(r.info.run_id, r.data.tags[REPLACED_BY_TAG]) for r in deleted] == [(run.data.tags[REPLACES_TAG], run.info.run_id)]

    final_psnr = max(history["psnr"], key=lambda m: m.step).value
    assert run.data.metrics["psnr"] == final_psnr
    with open(tmp_path / "restorch_runs" / "crash" / "results.csv") as results:
        (row,) = csv.DictReader(results)
    assert float(row["psnr"]) == pytest.approx(final_psnr)
    version = model_registry.register("crash", "crashed", uri=uri)
    assert version.run_id == run.info.run_id and version.tags["val.psnr"] == f"{final_psnr:.4f}"
