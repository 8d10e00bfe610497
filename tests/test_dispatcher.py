"""Exactly one Ray job per experiment: the dispatcher records a submission id before it submits,
submits idempotently and reconciles with the cluster, so a failed database write or a dead service
between submitting and recording starts no second job and breaks no user's limit.

The fast tests tick the dispatcher over test_service's instant FakeCluster; the slow one runs the real
`restorch serve` (tests/faulty_serve.py: with a real SQLite lock, then a SIGKILL, right after a
submission) against a real Ray head and counts the head's jobs.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.exc import OperationalError

from orchestrator.service.auth import create_token
from orchestrator.service.dispatcher import RAY_FINAL_STATES, ClusterJob, Dispatcher, Limits
from orchestrator.service.db import FINAL_STATES, Experiment, database_id, open_database
from faulty_serve import fail_next_commit_in_this_thread
from servers import answers, free_port, started, wait_for
from test_service import FakeCluster, Service, bearer, spec, submit, wait_for_status

LIMITS = Limits(max_running=2, max_running_per_user=1)
ENDED = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)


class Killed(BaseException):
    """The service's process died here (nothing after it runs)."""


def after_next_submit(cluster: FakeCluster, fault: Callable[[], None]) -> None:
    """`fault` happens once, right after the cluster accepts the next job."""
    submit = cluster.submit

    def faulty(experiment: Experiment, submission_id: str) -> None:
        submit(experiment, submission_id)
        cluster.submit = submit
        fault()

    cluster.submit = faulty


def die() -> None:
    raise Killed


def statuses(service: Service) -> dict[str, str]:
    return {e["name"]: e["status"] for e in service.get("/experiments").json()}


def run_out(service: Service) -> None:
    """Tick until every experiment has ended, checking the user limit all along."""
    for _ in range(30):
        service.tick()
        running = service.get("/experiments", status="running").json()
        assert max(Counter(e["user"] for e in running).values(), default=0) <= LIMITS.max_running_per_user
        if set(statuses(service).values()) <= set(FINAL_STATES):
            return
    raise AssertionError(f"not all ended: {statuses(service)}")


def test_a_database_write_failing_after_submit_starts_no_second_job(tmp_path):
    service = Service(tmp_path, LIMITS)
    first, _ = service.submit("alice", "first"), service.submit("alice", "second")
    after_next_submit(service.cluster, fail_next_commit_in_this_thread)
    with pytest.raises(OperationalError, match="database is locked"):
        service.tick()
    pending = service.get(f"/experiments/{first['id']}").json()
    assert pending["status"] == "queued" and pending["ray_job_id"] in service.cluster.left
    service.tick()
    assert service.get(f"/experiments/{first['id']}").json()["status"] == "running"
    run_out(service)
    assert [e.name for e in service.cluster.submitted] == ["first", "second"]
    assert service.cluster.peak_per_user["alice"] == 1
    assert set(statuses(service).values()) == {"succeeded"}


def test_a_restarted_service_adopts_the_job_its_predecessor_submitted_before_dying(tmp_path):
    service = Service(tmp_path, LIMITS)
    first, _ = service.submit("alice", "first"), service.submit("alice", "second")
    after_next_submit(service.cluster, die)
    with pytest.raises(Killed):
        service.tick()
    Dispatcher(service.sessions, service.cluster, LIMITS).tick()  # the next service's first pass
    adopted = service.get(f"/experiments/{first['id']}").json()
    assert adopted["status"] == "running" and list(service.cluster.left) == [adopted["ray_job_id"]]
    assert statuses(service)["second"] == "queued"  # alice's limit
    run_out(service)
    assert [e.name for e in service.cluster.submitted] == ["first", "second"]
    assert service.cluster.peak_per_user["alice"] == 1


def test_live_jobs_of_this_database_that_no_experiment_owns_are_stopped(tmp_path):
    service = Service(tmp_path, LIMITS)
    cancelled = service.submit("alice", "cancelled")
    after_next_submit(service.cluster, die)
    with pytest.raises(Killed):
        service.tick()
    response = service.client.post(f"/experiments/{cancelled['id']}/cancel", headers=service.headers["alice"])
    assert response.json()["status"] == "cancelled"  # while queued: the API cannot know its job was submitted
    prefix = f"restorch-serve-{database_id(service.sessions)}-"
    others = ("restorch-train-cli-1a2b3c", "restorch-serve-0ther0db-1")  # `restorch submit`'s, another service's
    for job_id in (f"{prefix}999", *others):
        service.cluster.left[job_id] = 100
    Dispatcher(service.sessions, service.cluster, LIMITS).tick()
    assert service.cluster.stopped == {f"{prefix}{cancelled['id']}", f"{prefix}999"}


class EndingCluster(FakeCluster):
    """Its jobs say when they ended."""

    def jobs(self) -> dict[str, ClusterJob]:
        return {job_id: job._replace(end_time=ENDED) if job.status in RAY_FINAL_STATES else job
                for job_id, job in super().jobs().items()}


def test_finished_at_is_when_the_job_ended(tmp_path):
    service = Service(tmp_path, LIMITS)
    experiment = service.submit("alice", "ended")
    dispatcher = Dispatcher(service.sessions, EndingCluster(), LIMITS)
    for _ in range(5):
        dispatcher.tick()
    done = service.get(f"/experiments/{experiment['id']}").json()
    assert done["status"] == "succeeded"
    assert datetime.fromisoformat(done["finished_at"]) == ENDED


# ------------------------------------------------------------------------------------------------
# the real `restorch serve` and a real Ray head


@contextmanager
def faulty_serve(db: str, ray_url: str, env: dict[str, str], log: Path,
                 faults: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`restorch serve` (tests/faulty_serve.py with `faults`): room for two experiments, one per user."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).parent / "faulty_serve.py"), json.dumps(faults), "serve",
               "--db", db, "--ray-address", ray_url, "--port", str(port), "--max-running", "2",
               "--storage-root", str(log.parent / "runs"), "--data-root", "/"]  # orchestrator/service/policy.py
    url = f"http://127.0.0.1:{port}"
    with started(command, env=env, log=log, marker=db) as process:
        wait_for(lambda: answers(f"{url}/openapi.json"), timeout=180, what="restorch serve", process=process, log=log)
        yield url, process


class RayJobs:
    """The Ray head's jobs, through Ray's own client."""

    def __init__(self, ray_url: str, env: dict[str, str]) -> None:
        from ray.job_submission import JobSubmissionClient

        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.client = JobSubmissionClient(ray_url, headers={"Authorization": f"Bearer {token}"})

    def of(self, name: str) -> list[Any]:
        """The jobs that run the spec `name`."""
        return [job for job in self.client.list_jobs() if (job.metadata or {}).get("restorch_spec") == name]

    def live(self) -> list[Any]:
        return [job for job in self.client.list_jobs() if not job.status.is_terminal()]


@pytest.mark.slow
def test_one_ray_job_per_experiment_through_a_failed_database_write_and_a_killed_service(ray_cluster, derain_data,
                                                                                        tmp_path):
    """Alice (limit 1) queues two experiments. The service's record of the first one's job fails
    (`database is locked`); the first one's end starts the second, whose submission the service does
    not survive; the next service takes over. Each experiment has one Ray job, whatever the jobs do."""
    ray_url, env = ray_cluster
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    token = create_token(open_database(db), "alice")
    ray = RayJobs(ray_url, env)
    body = {name: {"kind": "train", "spec": spec(name, tmp_path / "runs", derain_data, iterations=100_000)}
            for name in ("locked", "killed")}

    faults = {"locked": "locked", "killed": "kill"}
    with faulty_serve(db, ray_url, env, tmp_path / "serve-1.log", faults) as (url, process):
        locked, killed = submit(url, token, body["locked"]), submit(url, token, body["killed"])
        wait_for(lambda: ray.of("locked"), timeout=180, what="the first Ray job", process=process)
        first = [job.submission_id for job in ray.of("locked")]
        assert len(first) == 1, f"Ray jobs of one experiment: {first}"
        ray.client.stop_job(first[0])  # alice's turn for the second (stopped in Ray: the service dies)
        wait_for(lambda: process.poll() is not None or len(ray.of("locked")) > 1, timeout=180,
                 what="the service's death submitting the second")
        assert [job.submission_id for job in ray.of("locked")] == first
        assert process.returncode == -signal.SIGKILL
    assert "database is locked" in (tmp_path / "serve-1.log").read_text()  # the record of the first job failed
    assert len(ray.of("killed")) == 1

    with faulty_serve(db, ray_url, env, tmp_path / "serve-2.log", {}) as (url, _):
        adopted = wait_for_status(url, token, killed["id"], {"running", *FINAL_STATES}, timeout=180)
        assert [job.submission_id for job in ray.of("killed")] == [adopted["ray_job_id"]]
        assert len(ray.of("locked")) == 1 and len(ray.live()) <= 1
        cancel = requests.post(f"{url}/experiments/{killed['id']}/cancel", headers=bearer(token), timeout=60)
        assert cancel.status_code in (200, 409), cancel.text  # 409: it had failed already
        ended = [wait_for_status(url, token, experiment["id"], set(FINAL_STATES), timeout=180)
                 for experiment in (locked, killed)]
    for experiment in ended:
        job = ray.client.get_job_info(experiment["ray_job_id"])
        assert job.status.is_terminal() and [j.submission_id for j in ray.of(experiment["name"])] == [job.submission_id]
        ended_at = datetime.fromtimestamp(job.end_time / 1000, timezone.utc)
        assert datetime.fromisoformat(experiment["finished_at"]) == ended_at  # when Ray says it ended
