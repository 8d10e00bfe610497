"""Sweeps survive faults: one driver per sweep (a lock in storage, local and S3: orchestrator/run/sweep_lock.py), and a
storage that fills up is reported as such, the MLflow parent run closed FAILED, and the same command resumes
every trial with its values once there is space again (orchestrator/run/sweep.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.run.sweep_lock import LOCK_FILE, SweepLocked, sweep_lock
from servers import S3_ENV, moto_s3, s3_client

HOLDER = """
import sys
from orchestrator.run.sweep_lock import sweep_lock
with sweep_lock(sys.argv[1], sys.argv[2] or None):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold(folder: str, endpoint: str | None = None) -> subprocess.Popen:
    """Another driver: a process holding the sweep's lock until its stdin closes (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, folder, endpoint or ""], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **S3_ENV},
                              cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "held"
    return holder


def killed(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=30)


def test_a_local_sweep_has_one_driver_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    folder = str(tmp_path / "runs" / "sweep")
    holder = hold(folder)
    try:
        with pytest.raises(SweepLocked, match=f"pid {holder.pid} on {socket.gethostname()}, started 20"):
            with sweep_lock(folder):
                pass
    finally:
        killed(holder)  # SIGKILL: no chance to release anything
    with sweep_lock(folder):
        assert json.loads((Path(folder) / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.fixture
def bucket(monkeypatch) -> Iterator[tuple[str, object]]:
    with moto_s3() as endpoint:
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="team")
        yield endpoint, s3


def test_an_s3_sweep_has_one_driver_and_stale_locks_are_taken_over(bucket):
    endpoint, s3 = bucket
    folder, key = "s3://team/sweeps/sweep", f"sweeps/sweep/{LOCK_FILE}"
    holder = hold(folder, endpoint)
    try:
        with pytest.raises(SweepLocked, match=f"pid {holder.pid} on {socket.gethostname()}"):
            with sweep_lock(folder, endpoint):
                pass
    finally:
        killed(holder)
    with sweep_lock(folder, endpoint):  # same host, pid gone: taken over at once
        assert json.loads(s3.get_object(Bucket="team", Key=key)["Body"].read())["pid"] == os.getpid()
    assert "Contents" not in s3.list_objects_v2(Bucket="team", Prefix=key)  # released

    other = {"host": "node-7", "pid": 1, "started": "2026-12-01T20:00:00+00:00"}
    s3.put_object(Bucket="team", Key=key, Body=json.dumps({**other, "expires": time.time() + 600}).encode())
    with pytest.raises(SweepLocked, match="pid 1 on node-7, started 2026-12-01T20:00:00"):
        with sweep_lock(folder, endpoint):  # another host's lease still runs
            pass
    s3.put_object(Bucket="team", Key=key, Body=json.dumps({**other, "expires": time.time() - 1}).encode())
    with sweep_lock(folder, endpoint):  # its lease ran out: the driver is gone
        assert json.loads(s3.get_object(Bucket="team", Key=key)["Body"].read())["host"] == socket.gethostname()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 9 MB tmpfs (we are root), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(disk)], check=True, timeout=30)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_full_disk_is_reported_and_the_resume_keeps_every_trial(derain_data, tmp_path, small_disk):
    """Storage on a 9 MB tmpfs fills during the first trial's checkpoints: the sweep fails naming ENOSPC and the
    storage folder, its MLflow parent run FAILED. Once the disk is larger, the same command resumes: both trials,
    each with its lr, and a best_spec.yaml that `restorch spec check` accepts."""
    import csv

    import yaml
    from conftest import TINY_RESTORMER, sweep_runs
    from mlflow.tracking import MlflowClient
    from servers import BIN

    name, workdir = "full", tmp_path / "work"
    workdir.mkdir()
    spec = {"name": name, "model": TINY_RESTORMER, "task": "deraining",
            "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32,
                     "batch_size": 2},
            "train": {"iterations": 8, "val_every": 2, "checkpoint_every": 2, "log_every": 2,
                      "lr": {"grid": [1.0e-3, 2.0e-3]}},
            "search": {"algorithm": "grid", "max_concurrent_trials": 1},
            "storage": {"path": str(small_disk / "runs")}}
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=900)

    full = sweep()
    print(full.stdout[-3000:], full.stderr[-3000:])
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
    assert "No space left on device (ENOSPC)" in full.stderr and str(small_disk / "runs" / name) in full.stderr
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert sweep_runs(client, name)[0].info.status == "FAILED"

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True, timeout=30)
    resumed = sweep()
    print(resumed.stdout[-3000:], resumed.stderr[-3000:])
    if "saved Tune state of sweep full" in resumed.stderr:
        # The disk filled while Tune wrote its own state (which it writes in place): the resume refuses,
        # naming the folder and the cause, and drops nothing (the "refuse with the cause").
        assert resumed.returncode == 2 and "cannot be read" in resumed.stderr
        assert str(small_disk / "runs" / name) in resumed.stderr
        assert sweep_runs(client, name)[0].info.status == "FAILED"
        assert not (small_disk / "runs" / name / "results.csv").exists()
        return
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep" in resumed.stdout
    with open(small_disk / "runs" / name / "results.csv") as results:
        rows = list(csv.DictReader(results))
    assert sorted(float(row["train.lr"]) for row in rows) == [1.0e-3, 2.0e-3]
    assert all(row["status"] == "finished" for row in rows), rows
    check = subprocess.run([str(BIN / "restorch"), "spec", "check", str(small_disk / "runs" / name / "best_spec.yaml")],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    parent, children = sweep_runs(client, name)
    assert parent.info.status == "FINISHED" and len(children) == 2
