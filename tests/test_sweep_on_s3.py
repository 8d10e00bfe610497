"""A sweep stored on S3 (moto, `storage.endpoint_url`) and tracked on a shared MLflow server
(PostgreSQL + S3 artifacts): the driver is killed mid-sweep, its working directory deleted, and the
sweep resumes from the bucket alone; its checkpoints and MLflow artifacts are in the bucket, and its
runs and the model registered from it are visible to a second client with no S3 credentials."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RESTORMER
from orchestrator.cli import main
from servers import BIN, S3_ENV, shared_tracking, stop_process_group

BUCKET = "restorch-team"
NAME = "s3sweep"
ITERATIONS = 24

SECOND_CLIENT = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
runs = client.search_runs([client.get_experiment_by_name(sys.argv[2]).experiment_id])
version = client.get_latest_versions("derain")[0]
weights = client.download_artifacts(version.run_id, "model/model.pt", sys.argv[3])
print(json.dumps({"runs": [{"id": r.info.run_id, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
                            "metrics": r.data.metrics} for r in runs],
                  "version_run": version.run_id, "weights": weights}))
"""


@pytest.fixture(scope="module")
def team():
    """moto S3 + PostgreSQL + `restorch tracking up`: yields (tracking URL, S3 endpoint, boto3 client)."""
    with shared_tracking(BUCKET) as (url, endpoint, s3, _):
        yield url, endpoint, s3


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def sweep(spec: Path, workdir: Path) -> subprocess.Popen:
    """`restorch sweep spec` in a new `workdir`, in its own session (its embedded Ray too), with moto's credentials."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(S3_ENV)
    workdir.mkdir()
    with open(workdir / "sweep.log", "w") as log:
        return subprocess.Popen([str(BIN / "restorch"), "sweep", str(spec)], cwd=workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_sweep_killed_resumes_from_s3_alone_and_is_shared(team, derain_data, tmp_path):
    url, endpoint, s3 = team
    spec = {
        "name": NAME, "model": TINY_RESTORMER, "task": "deraining",
        "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": ITERATIONS, "val_every": 2, "checkpoint_every": 2, "log_every": 2,
                  "lr": {"grid": [1.0e-3, 2.0e-3]}},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "storage": {"path": f"s3://{BUCKET}/sweeps", "endpoint_url": endpoint},
        "tracking": {"uri": url, "experiment": NAME},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    workdir = tmp_path / "work"

    # Kill the driver (and its embedded Ray) once both trials are training, past their second
    # checkpoint. (Not earlier: a worker killed while DeepSpeed builds its CPU op leaves the build's
    # lock file behind, and every later job on the machine waits for it forever.) A trial's
    # checkpoint 4 is pruned once two later ones are kept, so the trials are collected over polls,
    # and run ITERATIONS = 24 so that the sweep cannot end between one poll and the next.
    first = sweep(tmp_path / "spec.yaml", workdir)
    try:
        deadline = time.monotonic() + 600
        past_second_checkpoint: set[str] = set()
        while len(past_second_checkpoint) < 2:
            assert first.poll() is None, (workdir / "sweep.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trials never reached their second checkpoint"
            time.sleep(1)
            for key in keys(s3, f"sweeps/{NAME}/jobs/"):
                checkpoint = re.search(r"/checkpoint_(\d+)/", key)
                if checkpoint and int(checkpoint.group(1)) >= 4:
                    past_second_checkpoint.add(key.split("/")[3])
    finally:
        stop_process_group(first, grace=0)
    assert f"sweeps/{NAME}/results.csv" not in keys(s3, f"sweeps/{NAME}/")

    # Nothing local survives: the same spec resumes the sweep from what the bucket holds.
    shutil.rmtree(workdir)
    second = sweep(tmp_path / "spec.yaml", workdir)
    try:
        assert second.wait(timeout=900) == 0, (workdir / "sweep.log").read_text()[-3000:]
    finally:
        stop_process_group(second)
    assert "resuming sweep" in (workdir / "sweep.log").read_text()

    stored = keys(s3, "")
    assert f"sweeps/{NAME}/results.csv" in stored and f"sweeps/{NAME}/spec.yaml" in stored
    finals = [key for key in stored if key.endswith(f"checkpoint_{ITERATIONS:07d}/model.pt")]
    assert len(finals) == 2  # each trial's final checkpoint, in the bucket
    models = [key for key in stored if key.startswith("mlflow/") and key.endswith("/artifacts/model/model.pt")]
    assert len(models) == 2  # each trial's model, logged through the server into the bucket

    assert main(["register", NAME, "--name", "derain", "--tracking-uri", url]) == 0

    client_env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_"))}
    second_client = subprocess.run([sys.executable, "-c", SECOND_CLIENT, url, NAME, str(tmp_path / "download")],
                                   env=client_env, capture_output=True, text=True, timeout=180)
    assert second_client.returncode == 0, second_client.stderr
    seen = json.loads(second_client.stdout)
    parents = [run for run in seen["runs"] if run["parent"] is None]
    trials = [run for run in seen["runs"] if run["parent"] is not None]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert len(trials) == 2 and all(run["status"] == "FINISHED" for run in trials)
    assert all(run["metrics"]["iteration"] == ITERATIONS for run in trials)
    assert max(run["metrics"]["resumed_from"] for run in trials) >= 2  # the interrupted job went on from S3
    assert seen["version_run"] in {run["id"] for run in trials}
    assert Path(seen["weights"]).stat().st_size > 0
