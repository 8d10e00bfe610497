"""Two Ray nodes that share no disk: a head (`ray start --head`) and a worker node started in a mount
namespace of its own (`unshare -m`), where a private tmpfs hides the head's working folder, the local
copy of the data, the datasets' cache folder, the MLflow server's folder and the head's Ray folder. Only
S3 (moto) and the MLflow server (http) are shared, as on a real cluster. The worker node is started
without AWS or MLflow variables: the trials there get them through the job's runtime_env.

Needs root (unshare, mount), as CI has.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RESTORMER
from orchestrator.run.remote import FORWARDED_ENV
from orchestrator.run.sweep import TRIAL_RESOURCE
from orchestrator.tracking.keys import CHECKPOINT_PATH_TAG, PARENT_TAG
from servers import (BIN, S3_ENV, moto_s3, node_ports, ray_env, ray_head, s3_client, started, stop_process_group,
                     tracking_server, wait_for)

BUCKET = "unshared"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="a node without the head's disk needs root (unshare -m)")]


@contextmanager
def worker_node(head: Path, gcs: str, hidden: list[Path]) -> Iterator[None]:
    """`ray start --address gcs --block` (1 CPU) in its own mount namespace, each of `hidden` covered by
    an empty tmpfs there; its environment has no AWS or MLflow variables."""
    root = Path(tempfile.mkdtemp(prefix="rt-w-", dir="/tmp"))
    env = {key: value for key, value in ray_env(head).items() if key not in FORWARDED_ENV}
    start = [str(BIN / "ray"), "start", "--address", gcs, "--block", "--temp-dir", str(root / "ray"), "--num-cpus", "1",
             "--disable-usage-stats", *node_ports()]
    mounts = " && ".join(f"mount -t tmpfs -o size=256m tmpfs {shlex.quote(str(folder))}" for folder in hidden)
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(start)}"]
    log = root / "ray-worker.log"
    with started(command, env=env, log=log, marker=str(root / "ray")) as process:
        wait_for(lambda: "block forever" in log.read_text(), timeout=120, what="ray worker node", process=process, log=log)
        yield


@pytest.fixture(scope="module")
def unshared(derain_data: Path) -> Iterator[dict]:
    """moto S3 (the data uploaded to it), an MLflow server (SQLite, artifacts in S3), a head with the
    sweeps' trial slots and 1 CPU, and a worker node (1 CPU) without the head's disk."""
    with tempfile.TemporaryDirectory(prefix="rt-", dir="/tmp") as folder, moto_s3() as endpoint:
        root = Path(folder)
        work, cache, mlflow_root = root / "work", root / "cache", root / "mlflow"
        for made in (work, cache, mlflow_root):
            made.mkdir()
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for path in derain_data.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"rain/{path.relative_to(derain_data)}")
        with tracking_server(mlflow_root, f"sqlite:///{mlflow_root / 'mlflow.db'}", f"s3://{BUCKET}/mlflow", endpoint) as url, \
                ray_head(root, num_cpus=1, resources={TRIAL_RESOURCE: 2}) as dashboard:
            gcs = (root / "ray" / "ray_current_cluster").read_text().strip()
            with worker_node(root, gcs, [work, derain_data, cache, mlflow_root, root / "ray"]):
                yield {"root": root, "work": work, "cache": cache, "endpoint": endpoint, "s3": s3, "mlflow": url,
                       "gcs": gcs, "dashboard": dashboard}


def sweep_spec(cluster: dict, name: str, **changes: object) -> dict:
    spec = {
        "name": name, "model": TINY_RESTORMER, "task": "deraining",
        "data": {"train": f"s3://{BUCKET}/rain/train", "val": f"s3://{BUCKET}/rain/val", "patch_size": 32,
                 "batch_size": 2, "cache_dir": str(cluster["cache"])},
        "train": {"iterations": 4, "val_every": 2, "checkpoint_every": 2, "log_every": 2, "lr": {"grid": [1.0e-3, 2.0e-3]}},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "storage": {"path": f"s3://{BUCKET}/runs", "endpoint_url": cluster["endpoint"]},
        "tracking": {"uri": cluster["mlflow"]},
    }
    return {**spec, **changes}


def sweep(cluster: dict, spec: dict, log: Path) -> subprocess.CompletedProcess:
    """`restorch sweep spec.yaml --address GCS` from the head's working folder, with moto's credentials."""
    (cluster["work"] / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {key: value for key, value in ray_env(cluster["root"]).items() if key != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        process = subprocess.Popen([str(BIN / "restorch"), "sweep", "spec.yaml", "--address", cluster["gcs"]],
                                   cwd=cluster["work"], env={**env, **S3_ENV}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        process.wait(timeout=900)
    finally:
        stop_process_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text())


def state(cluster: dict, resource: str, **filters: str) -> list[dict]:
    """Rows of the head's state API (`resource`: jobs, actors; `filters`: key=value), with its token."""
    token = (cluster["root"] / "auth_token").read_text().strip()
    query = {"limit": 1000, "filter_keys": list(filters), "filter_predicates": ["="] * len(filters),
             "filter_values": list(filters.values())}
    reply = requests.get(f"{cluster['dashboard']}/api/v0/{resource}", params=query,
                         headers={"Authorization": f"Bearer {token}"}, timeout=60)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def s3_keys(cluster: dict, prefix: str) -> list[str]:
    listing = cluster["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_the_default_tracking_is_refused_before_any_compute(unshared, tmp_path):
    spec = sweep_spec(unshared, "refused")
    del spec["tracking"]
    jobs = len(state(unshared, "jobs"))
    done = sweep(unshared, spec, tmp_path / "refused.log")
    assert done.returncode == 2, done.stdout
    assert "tracking.uri (unset: the default) is sqlite:///" in done.stdout and "restorch tracking up" in done.stdout
    assert len(state(unshared, "jobs")) == jobs  # no driver ever connected
    assert sorted(path.name for path in unshared["work"].iterdir()) == ["spec.yaml"]
    assert s3_keys(unshared, "runs/refused") == []


def test_a_sweep_runs_one_trial_on_each_node_with_everything_in_mlflow_and_s3(unshared, tmp_path):
    done = sweep(unshared, sweep_spec(unshared, "two-nodes"), tmp_path / "sweep.log")
    print(done.stdout[-3000:])  # the 2-node run's output, shown with -s
    assert done.returncode == 0, done.stdout[-4000:]

    client = MlflowClient(unshared["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    (parent,) = [run for run in runs if PARENT_TAG not in run.data.tags]
    trials = [run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.metrics["iteration"] == 4
        assert [artifact.path for artifact in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
        checkpoint = run.data.tags[CHECKPOINT_PATH_TAG]  # the trial's last checkpoint, in the bucket
        assert checkpoint.startswith(f"s3://{BUCKET}/runs/two-nodes/jobs/"), checkpoint
        assert any(key.endswith("/model.pt") for key in s3_keys(unshared, checkpoint.removeprefix(f"s3://{BUCKET}/")))
    assert s3_keys(unshared, "mlflow/")  # the models went to the bucket through the server
    assert {"results.csv", "best_spec.yaml", "spec.yaml"} <= {key.rsplit("/", 1)[-1] for key in s3_keys(unshared, "runs/two-nodes/")}

    # One trial's training ran on each node: one-worker trials train inline, in their Tune trial actors (the class
    # Tune wraps a function trainable in), which reserve the worker's CPU and no trial_slot (the head's).
    trials = [actor for actor in state(unshared, "actors") if "ImplicitFunc" in actor["class_name"]]
    assert len({actor["node_id"] for actor in trials}) == 2, trials
    # Nothing was written on the head's disk but the spec: no local store, storage or data copy.
    assert sorted(path.name for path in unshared["work"].iterdir()) == ["spec.yaml"]
