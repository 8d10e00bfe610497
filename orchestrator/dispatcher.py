"""The dispatcher of `restorch serve`: moves queued experiments onto the cluster and follows them.

Every tick (a background thread, woken early by submissions and cancellations):
1. poll: the running experiments take the final state of their Ray job (SUCCEEDED -> succeeded,
   FAILED -> failed, STOPPED -> cancelled); a job the cluster no longer knows fails the experiment.
   Running experiments are found by their Ray job ids in the database, so a restarted service
   re-attaches to the jobs its predecessor started.
2. dispatch: while the cluster has room (fewer than `max_running` experiments running), submit the
   next experiment `pick_next` chooses: the highest priority first, then round-robin over users
   (the user whose last experiment started longest ago), never more than `max_running_per_user`
   running for one user.

The cluster is anything with submit/jobs/stop (`Cluster`); `RayCluster` is a Ray head's Jobs API.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.service_db import Experiment, transition, utcnow
from orchestrator.spec import SpecError
from orchestrator.submit import connect, submit_spec

log = logging.getLogger(__name__)

RAY_FINAL_STATES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}
NEVER = datetime.min.replace(tzinfo=timezone.utc)
POLL_S = 2.0  # seconds between ticks


class ClusterJob(NamedTuple):
    status: str  # Ray's job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str


class Cluster(Protocol):
    def submit(self, experiment: Experiment) -> str:
        """Start the experiment as a job; returns the job's id."""

    def jobs(self) -> dict[str, ClusterJob]:
        """Every job the cluster knows, by id."""

    def stop(self, job_id: str) -> None:
        """Ask the job to stop (it ends STOPPED)."""


class RayCluster:
    """A Ray head's Jobs API (orchestrator/submit.py): an experiment runs `restorch <kind> <spec>` as a
    Ray job, with this checkout's code unless `installed`."""

    def __init__(self, address: str, *, installed: bool = False) -> None:
        self.address, self.installed = address, installed

    def submit(self, experiment: Experiment) -> str:
        with tempfile.TemporaryDirectory(prefix="restorch-serve-") as folder:
            spec_file = Path(folder) / f"experiment-{experiment.id}.yaml"
            spec_file.write_text(experiment.spec)
            _, job_id = submit_spec(spec_file, kind=experiment.kind, address=self.address, installed=self.installed)
        return job_id

    def jobs(self) -> dict[str, ClusterJob]:
        return {job.submission_id: ClusterJob(job.status.value, job.message or "")
                for job in connect(self.address).list_jobs() if job.submission_id}

    def stop(self, job_id: str) -> None:
        connect(self.address).stop_job(job_id)


@dataclass(frozen=True)
class Limits:
    max_running: int = 4  # experiments running on the cluster at once
    max_running_per_user: int = 1


def pick_next(queued: Sequence[Experiment], running: Sequence[Experiment], last_started: dict[str, datetime],
              limits: Limits) -> Experiment | None:
    """The experiment to start next, or None when the cluster is full or every queued one waits on
    its user's limit: highest priority, then the user who started one longest ago, then the oldest."""
    if len(running) >= limits.max_running:
        return None
    per_user = Counter(experiment.user for experiment in running)
    eligible = [e for e in queued if per_user[e.user] < limits.max_running_per_user]
    if not eligible:
        return None
    top = max(e.priority for e in eligible)
    return min((e for e in eligible if e.priority == top), key=lambda e: (last_started.get(e.user, NEVER), e.id))


class Dispatcher:
    def __init__(self, sessions: sessionmaker[Session], cluster: Cluster, limits: Limits) -> None:
        self.sessions, self.cluster, self.limits = sessions, cluster, limits
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="restorch-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        """Tick now (a submission or a cancellation), not at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as error:  # the cluster or the database failed this tick: keep serving, retry
                log.warning("dispatcher: %s: %s; retrying in %.0f s", type(error).__name__, error, POLL_S)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def tick(self) -> None:
        self.poll()
        self.dispatch()

    def poll(self) -> None:
        with self.sessions() as session:
            running = session.scalars(select(Experiment).where(Experiment.status == "running")).all()
        if not running:
            return
        jobs = self.cluster.jobs()
        for experiment in running:
            job = jobs.get(experiment.ray_job_id)
            if job is None:
                message = f"the cluster has no job {experiment.ray_job_id} any more (was the cluster restarted?)"
                transition(self.sessions, experiment.id, "running", status="failed", message=message,
                           finished_at=utcnow())
            elif job.status in RAY_FINAL_STATES:
                transition(self.sessions, experiment.id, "running", status=RAY_FINAL_STATES[job.status],
                           message=job.message or None, finished_at=utcnow())

    def dispatch(self) -> None:
        while (experiment := self._next()) is not None:
            try:
                job_id = self.cluster.submit(experiment)
            except SpecError as error:  # the spec cannot run as submitted: retrying would not help
                transition(self.sessions, experiment.id, "queued", status="failed", message=f"not submitted: {error}",
                           finished_at=utcnow())
                continue
            except Exception as error:  # the cluster is unreachable or refused: stays queued, next tick retries
                transition(self.sessions, experiment.id, "queued",
                           message=f"waiting to be submitted: {type(error).__name__}: {error}")
                raise
            if not transition(self.sessions, experiment.id, "queued", status="running", ray_job_id=job_id, message=None,
                              started_at=utcnow()):
                self.cluster.stop(job_id)  # cancelled while it was being submitted

    def _next(self) -> Experiment | None:
        with self.sessions() as session:
            active = session.scalars(select(Experiment).where(Experiment.status.in_(("queued", "running")))).all()
            last_started = dict(session.execute(select(Experiment.user, func.max(Experiment.started_at))
                                                .group_by(Experiment.user)).all())
        queued = [e for e in active if e.status == "queued"]
        running = [e for e in active if e.status == "running"]
        return pick_next(queued, running, {user: t for user, t in last_started.items() if t is not None}, self.limits)

