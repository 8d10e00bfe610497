"""`restorch submit` and `restorch jobs` against a real Ray head started here (`ray start --head`,
dashboard on 127.0.0.1, token authentication with a token of its own: conftest.ray_cluster)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RESTORMER
from orchestrator.cli import main
from orchestrator.run.remote import FORWARDED_ENV, check_for_cluster
from orchestrator.service.app import ExperimentIn, validate_submission
from orchestrator.service.policy import ServicePolicy
from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import parse_spec
from orchestrator.run.submit import resolve_address, runtime_env
from servers import BIN, free_port

SHARED_TRACKING = "http://mlflow.example:5000"


def write_spec(path: Path, data: Path, storage: Path, *, name: str, iterations: int, **changes: object) -> Path:
    """A train spec whose storage folder is declared shared (every node of these tests' clusters is this machine)."""
    spec = {
        "name": name,
        "model": TINY_RESTORMER,
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": iterations, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
        "storage": {"path": str(storage), "shared": True},
        **changes,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def restorch(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "restorch"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)  # a hang guard, not a speed check: the head is asked once, before anything is uploaded
def test_submit_to_a_head_that_is_down_fails_at_once(derain_data, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", derain_data, tmp_path / "runs", name="down", iterations=2)
    assert main(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "no Ray head answers at http://127.0.0.1:" in capsys.readouterr().err


def test_address_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="no cluster given"):
        resolve_address(None)
    assert resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == resolve_address("http://head:8265/") == "http://head:8265"
    with pytest.raises(ValueError, match="disagree"):
        resolve_address("http://other:8265")


def test_paths_in_a_submitted_spec_must_mean_the_same_on_the_nodes(derain_data):
    raw = {"name": "paths", "model": TINY_RESTORMER, "task": "deraining",
           "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val")}, "storage": {"path": "s3://b/p"}}
    check_for_cluster(parse_spec(raw), tracked=False)
    check_for_cluster(parse_spec({**raw, "data": {"train": "s3://b/rain/train", "val": "s3://b/rain/val"}}), tracked=False)
    with pytest.raises(SpecError, match="data.train: data/train is relative"):
        check_for_cluster(parse_spec({**raw, "data": {"train": "data/train", "val": str(derain_data)}}), tracked=False)
    with pytest.raises(SpecError, match=r"storage.path: /nfs/runs is a local folder.*s3://.*storage.shared: true"):
        check_for_cluster(parse_spec({**raw, "storage": {"path": "/nfs/runs"}}), tracked=False)
    check_for_cluster(parse_spec({**raw, "storage": {"path": "/nfs/runs", "shared": True}}), tracked=False)
    with pytest.raises(SpecError, match="storage.path: restorch_runs is relative"):
        check_for_cluster(parse_spec({**raw, "storage": {"path": "restorch_runs", "shared": True}}), tracked=False)


@pytest.mark.parametrize("uri", [None, "sqlite:////nfs/mlflow.db", "file:///nfs/mlruns", "postgresql://db/mlflow"])
def test_sweeps_on_a_cluster_need_a_tracking_server(uri, derain_data, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"name": "tracked", "model": TINY_RESTORMER, "task": "deraining",
           "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val")}, "storage": {"path": "s3://b/p"}}
    spec = parse_spec({**raw, "tracking": {"uri": uri}})
    with pytest.raises(SpecError, match=r"a store on one node's disk.*restorch tracking up .*tracking.uri: http://"):
        check_for_cluster(spec, tracked=True)
    check_for_cluster(spec, tracked=False)  # `restorch train` logs nothing to MLflow
    check_for_cluster(parse_spec({**raw, "tracking": {"uri": SHARED_TRACKING}}), tracked=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SHARED_TRACKING)
    if uri is None:
        check_for_cluster(spec, tracked=True)  # the unset URI then means the server


def test_submit_refuses_a_sweep_with_the_default_tracking_before_anything_runs(derain_data, tmp_path, monkeypatch, capsys):
    """Refused before the cluster is contacted (none answers at the address) and nothing is written."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", derain_data, tmp_path / "runs", name="tracked", iterations=2,
                      search={"num_samples": 2})
    assert main(["submit", str(spec), "--kind", "sweep", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking.uri (unset: the default) is sqlite:///{tmp_path}/mlflow.db" in err and "restorch tracking up" in err
    assert "no Ray head answers" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spec.yaml"]


def test_sweep_on_a_cluster_refuses_the_default_tracking_before_ray_starts(derain_data, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", derain_data, tmp_path / "runs", name="swept", iterations=2,
                      train={"iterations": 2, "lr": {"grid": [1.0e-3, 2.0e-3]}})
    assert main(["sweep", str(spec), "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert "restorch tracking up" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spec.yaml"]


def test_the_service_refuses_what_the_cluster_nodes_would_not_share(derain_data, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"name": "served", "model": TINY_RESTORMER, "task": "deraining",
           "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val")},
           "train": {"lr": {"grid": [1.0e-3, 2.0e-3]}}, "storage": {"path": "s3://b/p/alice/served"}}
    untracked = ServicePolicy.create(["s3://b/p"], [str(derain_data)])
    with pytest.raises(SpecError, match="has no MLflow server"):
        validate_submission(ExperimentIn(kind="sweep", spec=raw), untracked, "alice")
    tracked = ServicePolicy.create(["s3://b/p"], [str(derain_data)], [SHARED_TRACKING])
    served = validate_submission(ExperimentIn(kind="sweep", spec=raw), tracked, "alice")
    assert served.tracking.uri == SHARED_TRACKING


def test_the_job_carries_the_tracking_and_s3_variables(monkeypatch, tmp_path):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    assert "env_vars" not in runtime_env(tmp_path, installed=True)
    forwarded = {"MLFLOW_TRACKING_URI": SHARED_TRACKING, "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
                 "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "eu-west-1"}
    for name, value in forwarded.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNRELATED", "x")
    assert runtime_env(tmp_path, installed=True)["env_vars"] == forwarded


@pytest.mark.slow
def test_submitted_train_job_succeeds_and_jobs_shows_it(ray_cluster, derain_data, tmp_path):
    url, env = ray_cluster
    spec = write_spec(tmp_path / "spec.yaml", derain_data, tmp_path / "runs", name="submitted", iterations=4)
    submitted = restorch("submit", str(spec), "--address", url, "--follow", env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split("submitted ", 1)[1].split()[0]
    assert "[restorch] iter 4/4" in submitted.stdout
    assert f"{job_id}: SUCCEEDED" in submitted.stdout
    assert (tmp_path / "runs" / "submitted" / "checkpoint_0000004" / "model.pt").exists()

    listed = restorch("jobs", "list", "--address", url, env=env)
    assert any(line.split()[:2] == [job_id, "SUCCEEDED"] for line in listed.stdout.splitlines()), listed.stdout
    logs = restorch("jobs", "logs", job_id, "--address", url, env=env)
    assert "[restorch] iter 4/4" in logs.stdout

    # Without the head's token the client is refused, with a message that says what to do.
    no_token = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH")}
    refused = restorch("jobs", "list", "--address", url, env=no_token)
    assert refused.returncode == 2
    assert "requires its token" in refused.stderr


@pytest.mark.slow
def test_a_running_job_can_be_stopped(ray_cluster, derain_data, tmp_path):
    url, env = ray_cluster
    spec = write_spec(tmp_path / "spec.yaml", derain_data, tmp_path / "runs", name="stopped", iterations=10_000)
    submitted = restorch("submit", str(spec), "--address", url, env=env)
    job_id = submitted.stdout.split("submitted ", 1)[1].split()[0]
    with subprocess.Popen([str(BIN / "restorch"), "jobs", "logs", job_id, "--follow", "--address", url], env=env,
                          stdout=subprocess.PIPE, text=True) as follow:
        try:
            for line in follow.stdout:
                # Stop once training runs (a worker stopped while DeepSpeed builds its CPU op would leave
                # the build's lock file behind, and later jobs on the machine would wait for it forever).
                if "[restorch] iter" in line:
                    break
            stopped = restorch("jobs", "stop", job_id, "--address", url, env=env)
            assert f"{job_id}: stopping" in stopped.stdout
            rest = follow.communicate(timeout=120)[0]
        finally:
            follow.kill()
    assert rest.rstrip().endswith(f"{job_id}: STOPPED")
