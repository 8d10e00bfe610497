"""`restorch serve`: the API, its tokens and its dispatcher.

Most tests run the app in this process (FastAPI's TestClient) over a fake, instant cluster and tick
the dispatcher by hand. The slow ones run `restorch serve` as a process against a real Ray head
(`ray start --head`, token auth) and real training jobs.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fastapi.testclient import TestClient

from conftest import TINY_RESTORMER
from orchestrator.service.auth import authenticate, create_token
from orchestrator.cli import main
from orchestrator.service.dispatcher import ClusterJob, Limits, pick_next
from orchestrator.service.app import MAX_BODY_BYTES, create_app
from orchestrator.service.db import FINAL_STATES, Experiment, Token, open_database
from orchestrator.service.policy import ServicePolicy
from servers import BIN, answers, free_port, postgres, started, tracking_server, wait_for

USERS = ("alice", "bob")


def spec(name: str, storage: Path, data: Path = Path("/data/rain"), iterations: int = 4) -> dict[str, Any]:
    return {"name": name, "model": TINY_RESTORMER, "task": "deraining",
            "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 2},
            "train": {"iterations": iterations, "val_every": 4, "checkpoint_every": 4},
            "storage": {"path": str(storage), "shared": True}}  # every node of these tests' clusters is this machine


class FakeCluster:
    """An instant cluster: a job runs for `polls` polls of the job list, then succeeds. As Ray's, it
    starts a job id once (`submit` of an id it has is a no-op)."""

    def __init__(self, polls: int = 2) -> None:
        self.polls = polls
        self.submitted: list[Experiment] = []
        self.left: dict[str, int] = {}
        self.owners: dict[str, Experiment] = {}
        self.stopped: set[str] = set()
        self.peak_per_user: Counter[str] = Counter()  # the most jobs one user had running at once
        self.down = False

    def _live(self) -> list[Experiment]:
        return [self.owners[job_id] for job_id, left in self.left.items() if left > 0 and job_id not in self.stopped]

    def submit(self, experiment: Experiment, submission_id: str) -> None:
        if self.down:
            raise ConnectionError("no Ray head answers")
        if submission_id in self.left:
            return
        self.submitted.append(experiment)
        self.left[submission_id], self.owners[submission_id] = self.polls, experiment
        for user, count in Counter(e.user for e in self._live()).items():
            self.peak_per_user[user] = max(self.peak_per_user[user], count)

    def jobs(self) -> dict[str, ClusterJob]:
        for job_id in self.left:
            self.left[job_id] = max(self.left[job_id] - 1, 0)
        return {job_id: ClusterJob("STOPPED" if job_id in self.stopped else "RUNNING" if left else "SUCCEEDED", "")
                for job_id, left in self.left.items()}

    def stop(self, job_id: str) -> None:
        self.stopped.add(job_id)


class Service:
    """The app over a fresh queue (SQLite in `root` unless `db`) and a FakeCluster, with a token per
    user and an admin's; storage in `root/runs`, data in /data, tracking on `tracking`."""

    def __init__(self, root: Path, limits: Limits, db: str | None = None, tracking: tuple[str, ...] = ()) -> None:
        self.sessions = open_database(db or f"sqlite:///{root / 'queue.db'}")
        self.cluster = FakeCluster()
        self.policy = ServicePolicy.create([str(root / "runs")], ["/data"], list(tracking))
        self.app = create_app(self.sessions, self.cluster, limits, self.policy)
        self.client = TestClient(self.app)
        self.headers = {user: {"Authorization": f"Bearer {create_token(self.sessions, user)}"} for user in USERS}
        self.headers["admin"] = {"Authorization": f"Bearer {create_token(self.sessions, 'root', admin=True)}"}
        self.root = root

    def submit(self, user: str, name: str, kind: str = "train", **changes: Any) -> dict[str, Any]:
        body = {"kind": kind, "spec": {**spec(name, self.root / "runs"), **changes}}
        response = self.client.post("/experiments", json=body, headers=self.headers[user])
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, path: str, caller: str = "admin", **params: Any) -> Any:
        return self.client.get(path, headers=self.headers[caller], params=params)

    def tick(self) -> None:
        self.app.state.dispatcher.tick()


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path, Limits(max_running=2, max_running_per_user=1))


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow tracking server (SQLite, artifacts in a folder): sweeps sent to a cluster log to a server."""
    root = tmp_path_factory.mktemp("mlflow")
    with tracking_server(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), None) as url:
        yield url


def test_token_create_prints_the_token_once_and_stores_only_its_hash(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    assert main(["serve", "--db", url, "token", "create", "carol", "--admin"]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    sessions = open_database(url)
    assert authenticate(sessions, token) is not None and authenticate(sessions, token).admin
    assert authenticate(sessions, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    with sessions() as session:
        stored = session.query(Token).one()
    assert token.split("_", 2)[2] not in (stored.id, stored.salt, stored.digest)
    assert main(["serve", "token", "create", "not a name", "--db", url]) == 2


def test_requests_need_a_token_and_users_see_only_their_own(service):
    assert service.client.get("/experiments").status_code == 401
    refused = service.client.get("/experiments", headers={"Authorization": "Bearer rst_0_guess"})
    assert refused.status_code == 401 and "restorch serve token create" in refused.json()["detail"]

    mine = service.submit("alice", "mine")
    assert mine["status"] == "queued" and mine["user"] == "alice"
    path = f"/experiments/{mine['id']}"
    assert service.get(path, "alice").status_code == 200
    for response in (service.get(path, "bob"), service.get(f"{path}/report", "bob"),
                     service.client.post(f"{path}/cancel", headers=service.headers["bob"])):
        assert response.status_code == 404 and response.json()["detail"] == f"no experiment {mine['id']} (among yours)"
    assert service.get("/experiments", "bob").json() == []
    assert service.get("/experiments", "bob", user="alice").json() == []
    assert [e["id"] for e in service.get("/experiments", "admin", user="alice").json()] == [mine["id"]]
    assert service.client.post(f"{path}/cancel", headers=service.headers["admin"]).json()["status"] == "cancelled"


def test_bad_requests_get_a_clear_4xx_and_queue_nothing(service):
    alice = service.headers["alice"]

    def post(**kwargs: Any) -> Any:
        return service.client.post("/experiments", headers=alice, **kwargs)

    good = spec("bad", service.root / "runs")
    malformed = service.client.post("/experiments", content=b'{"kind": "train", "spec": {',
                                    headers={**alice, "Content-Type": "application/json"})
    assert malformed.status_code == 422 and "JSON decode error" in str(malformed.json()["detail"])
    unknown_key = post(json={"kind": "train", "spec": {**good, "trian": {}}})
    assert unknown_key.status_code == 422 and "trian: unknown key" in unknown_key.json()["detail"]
    not_yaml = post(json={"kind": "train", "spec": "name: [unclosed"})
    assert not_yaml.status_code == 422 and "spec is not valid YAML" in not_yaml.json()["detail"]
    relative = post(json={"kind": "train", "spec": {**good, "data": {"train": "rain/train", "val": "/rain/val"}}})
    assert relative.status_code == 422 and "data.train: rain/train is relative" in relative.json()["detail"]
    searched = post(json={"kind": "train", "spec": {**good, "train": {"lr": {"grid": [1e-3, 2e-3]}}}})
    assert searched.status_code == 422 and "submit it with kind sweep" in searched.json()["detail"]
    oversized = post(json={"kind": "train", "spec": "#" * MAX_BODY_BYTES})
    assert oversized.status_code == 413
    assert service.get("/experiments/12345", "alice").json()["detail"] == "no experiment 12345 (among yours)"
    assert service.get("/experiments", "admin").json() == []

    assert post(json={"kind": "train", "spec": yaml.safe_dump(good)}).status_code == 201  # YAML text works
    clash = post(json={"kind": "train", "spec": good})
    assert clash.status_code == 409 and clash.json()["detail"].startswith("the name 'bad' is taken")


def test_pick_next_takes_priority_then_turns_by_user():
    limits = Limits(max_running=2, max_running_per_user=1)
    a1, a2, b1, urgent = (Experiment(id=id_, user=user, priority=priority)
                          for id_, user, priority in ((1, "a", 0), (2, "a", 0), (3, "b", 0), (4, "c", 5)))
    now = datetime.now(timezone.utc)
    assert pick_next([a1, a2, b1, urgent], [], {}, limits) is urgent
    assert pick_next([a1, a2, b1], [], {"a": now}, limits) is b1  # b never started one: b's turn
    assert pick_next([a1, a2, b1], [], {"a": now - timedelta(hours=1), "b": now}, limits) is a1
    assert pick_next([a1, a2, b1], [Experiment(id=9, user="b")], {}, limits) is a1  # b is at its limit
    assert pick_next([a1, b1], [Experiment(id=8, user="x"), Experiment(id=9, user="y")], {}, limits) is None  # full


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def queue_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The queue's database: SQLite, and PostgreSQL (a server started here) in the slow runs."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.db'}"
    else:
        with postgres("restorch") as url:
            yield url


def test_dispatcher_interleaves_users_fairly_within_limits(queue_db, tmp_path):
    service = Service(tmp_path, Limits(max_running=2, max_running_per_user=1), queue_db)
    for user in USERS:  # alice queues all of hers before bob's
        for index in range(3):
            service.submit(user, f"{user}-{index}")
    for _ in range(30):
        service.tick()
        running = service.get("/experiments", status="running").json()
        assert len(running) <= 2 and max(Counter(e["user"] for e in running).values(), default=0) <= 1
        if all(e["status"] in FINAL_STATES for e in service.get("/experiments").json()):
            break
    assert [e.user for e in service.cluster.submitted] == ["alice", "bob"] * 3
    assert max(service.cluster.peak_per_user.values()) == 1
    assert [e["status"] for e in service.get("/experiments").json()] == ["succeeded"] * 6


def test_cancel_of_a_running_experiment_stops_its_job(service):
    experiment = service.submit("alice", "stopped")
    service.tick()
    path = f"/experiments/{experiment['id']}"
    running = service.get(path, "alice").json()
    assert running["status"] == "running" and running["ray_job_id"].endswith(f"-{experiment['id']}")
    cancelled = service.client.post(f"{path}/cancel", headers=service.headers["alice"]).json()
    assert cancelled["status"] == "running" and cancelled["message"].startswith("stop requested")
    assert service.cluster.stopped == {running["ray_job_id"]}
    service.tick()
    assert service.get(path, "alice").json()["status"] == "cancelled"
    again = service.client.post(f"{path}/cancel", headers=service.headers["alice"])
    assert again.status_code == 409 and "already ended: cancelled" in again.json()["detail"]


def test_the_queue_waits_out_a_cluster_outage_and_fails_lost_jobs(service):
    experiment = service.submit("alice", "patient")
    path = f"/experiments/{experiment['id']}"
    service.cluster.down = True
    with pytest.raises(ConnectionError):
        service.tick()
    waiting = service.get(path).json()
    assert waiting["status"] == "queued" and waiting["message"].startswith("waiting to be submitted: ConnectionError")
    service.cluster.down = False
    service.tick()
    running = service.get(path).json()
    assert running["status"] == "running"
    service.cluster.left.clear()  # the cluster was restarted and forgot its jobs
    service.tick()
    lost = service.get(path).json()
    assert lost["status"] == "failed" and lost["message"].startswith(f"the cluster has no job {running['ray_job_id']}")


def test_a_sweep_shows_its_trials_and_its_report_once_written(tmp_path, mlflow_url):
    service = Service(tmp_path, Limits(), tracking=(mlflow_url,))
    train = {"iterations": 4, "val_every": 4, "checkpoint_every": 4, "lr": {"grid": [1e-3, 2e-3]}}
    tracking = {"uri": mlflow_url}
    sweep = service.submit("alice", "swept", kind="sweep", train=train, tracking=tracking)
    path = f"/experiments/{sweep['id']}/report"
    missing = service.get(path, "alice")
    assert missing.status_code == 404 and "has no report yet (queued)" in missing.json()["detail"]
    service.tick()
    assert service.get(f"/experiments/{sweep['id']}").json()["result"] is None  # the sweep has not started yet
    folder = service.root / "runs" / "alice" / "swept"  # each user's experiments in their own folder
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(service.get(f"/experiments/{sweep['id']}").json()["spec"])
    started_sweep = service.get(f"/experiments/{sweep['id']}").json()
    assert started_sweep["result"] == {"trials": [], "best": None}, started_sweep["result_error"]
    (folder / "results.csv").write_text("trial,status,train.lr,psnr\nt1,finished,0.001,21.5\n")
    report = service.get(path, "alice").json()
    assert report["folder"] == str(folder) and report["files"] == {"results.csv": (folder / "results.csv").read_text()}
    train = service.submit("alice", "trained")
    assert "writes no report" in service.get(f"/experiments/{train['id']}/report", "alice").json()["detail"]


def test_an_ablation_report_holds_its_paper_style_table_from_mlflow(tmp_path, mlflow_url):
    from orchestrator.run.ablation_run import run_ablation
    from orchestrator.spec.load import parse_spec

    ablation = {"profile_only": True, "factors": {"kv": [{"label": "GLMHA r=0.25", "set": {"model.glmha.kv_reduction": 0.25}},
                                                          {"label": "GLMHA r=0.75", "set": {"model.glmha.kv_reduction": 0.75}}]}}
    changes = {"model": {**TINY_RESTORMER, "attention": "glmha", "glmha": {}}, "ablation": ablation,
               "tracking": {"uri": mlflow_url}}
    service = Service(tmp_path, Limits(), tracking=(mlflow_url,))
    experiment = service.submit("alice", "kv-ablation", kind="ablate", **changes)
    path = f"/experiments/{experiment['id']}/report"
    assert service.get(path, "alice").status_code == 404  # not run yet: no table
    service.tick()
    assert service.get(path, "alice").status_code == 404  # running, its table not written yet
    run_ablation(parse_spec(yaml.safe_load(service.get(f"/experiments/{experiment['id']}").json()["spec"])))
    files = service.get(path, "alice").json()["files"]
    assert {"table.csv", "table.md", "table.tex"} <= set(files)
    assert "GLMHA r=0.25" in files["table.md"] and "GLMHA r=0.75" in files["table.md"]
    same_name = service.submit("bob", "kv-ablation", kind="ablate", **changes)  # bob's own, not run yet
    service.tick()
    assert service.get(f"/experiments/{same_name['id']}/report", "bob").status_code == 404  # never alice's table


# ------------------------------------------------------------------------------------------------
# `restorch serve` against a real Ray head


@contextmanager
def serve(db: str, ray_url: str, env: dict[str, str], log: Path, storage: Path, data: Path) -> Iterator[tuple[str, Any]]:
    """`restorch serve` on a free port (one experiment at a time, in `storage`, data from `data`); yields
    its URL and process."""
    port = free_port()
    command = [str(BIN / "restorch"), "serve", "--db", db, "--ray-address", ray_url, "--port", str(port),
               "--max-running", "1", "--storage-root", str(storage), "--data-root", str(data)]
    url = f"http://127.0.0.1:{port}"
    with started(command, env=env, log=log, marker=db) as process:
        wait_for(lambda: answers(f"{url}/openapi.json"), timeout=180, what="restorch serve", process=process, log=log)
        yield url, process


def wait_for_status(url: str, token: str, experiment_id: int, statuses: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        experiment = requests.get(f"{url}/experiments/{experiment_id}", headers=bearer(token), timeout=60).json()
        if experiment["status"] in statuses:
            return experiment
        assert time.monotonic() < deadline, f"experiment still {experiment['status']} after {timeout} s: {experiment}"
        time.sleep(1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ray_job_status(ray_url: str, env: dict[str, str], job_id: str) -> str:
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return requests.get(f"{ray_url}/api/jobs/{job_id}", headers=bearer(token), timeout=30).json()["status"]


def submit(url: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{url}/experiments", json=body, headers=bearer(token), timeout=120)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.slow
def test_an_experiment_runs_to_its_result_across_a_service_restart(ray_cluster, derain_data, tmp_path):
    ray_url, env = ray_cluster
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    token = create_token(open_database(db), "alice")
    body = {"kind": "train", "spec": spec("restarted", tmp_path / "runs", derain_data)}
    with serve(db, ray_url, env, tmp_path / "serve-1.log", tmp_path / "runs", derain_data) as (url, process):
        experiment = submit(url, token, body)
        assert experiment["status"] == "queued"
        job_id = wait_for_status(url, token, experiment["id"], {"running"}, timeout=120)["ray_job_id"]
        os.killpg(process.pid, signal.SIGKILL)  # the service dies mid-run, without any clean-up
        process.wait()
    with serve(db, ray_url, env, tmp_path / "serve-2.log", tmp_path / "runs", derain_data) as (url, _):
        again = requests.get(f"{url}/experiments/{experiment['id']}", headers=bearer(token), timeout=60).json()
        assert again["ray_job_id"] == job_id
        done = wait_for_status(url, token, experiment["id"], set(FINAL_STATES), timeout=300)
    assert done["status"] == "succeeded", done["message"]
    assert done["result"]["metrics"]["iteration"] == 4 and done["result"]["metrics"]["psnr"] > 0
    assert done["result"]["checkpoint"] == str(tmp_path / "runs" / "alice" / "restarted" / "checkpoint_0000004")
    assert done["links"]["ray_job"] == f"{ray_url}/#/jobs/{job_id}"
    assert ray_job_status(ray_url, env, job_id) == "SUCCEEDED"


@pytest.mark.slow
def test_cancel_stops_the_ray_job(ray_cluster, derain_data, tmp_path):
    ray_url, env = ray_cluster
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    token = create_token(open_database(db), "alice")
    body = {"kind": "train", "spec": spec("endless", tmp_path / "runs", derain_data, iterations=100_000)}
    with serve(db, ray_url, env, tmp_path / "serve.log", tmp_path / "runs", derain_data) as (url, _):
        experiment = submit(url, token, body)
        job_id = wait_for_status(url, token, experiment["id"], {"running"}, timeout=120)["ray_job_id"]
        wait_for(lambda: ray_job_status(ray_url, env, job_id) == "RUNNING", timeout=120, what="the Ray job")
        cancel = requests.post(f"{url}/experiments/{experiment['id']}/cancel", headers=bearer(token), timeout=60)
        assert cancel.status_code == 200, cancel.text
        done = wait_for_status(url, token, experiment["id"], set(FINAL_STATES), timeout=120)
    assert done["status"] == "cancelled", done["message"]
    assert ray_job_status(ray_url, env, job_id) == "STOPPED"
