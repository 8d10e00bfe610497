"""The dispatcher of `restorch serve`: moves queued experiments onto the cluster and follows them.

Every pass (a background thread, woken early by submissions and cancellations) lists the cluster's
jobs once, then:
1. reconcile: a running experiment takes the final state of its Ray job (SUCCEEDED -> succeeded,
   FAILED -> failed, STOPPED -> cancelled) and the time the job ended; a job the cluster no longer
   knows fails it. A job named as this database's (`restorch-serve-{database id}-...`) that is still
   live but whose experiment is unknown or over (cancelled while it was being submitted) is stopped.
   The first pass does this on start-up, so a restarted service carries on with its predecessor's jobs.
2. dispatch: an experiment is started in three steps, each safe to repeat after a crash or a database
   error: its submission id is recorded (it then counts against the limits, while still queued), the
   job is submitted under that id unless the cluster has it already, and the experiment is recorded
   running. A queued experiment with an id (a pass failed between the steps) is finished first: its
   job is adopted if the cluster has it, else submitted. Then, while the cluster has room (fewer than
   `max_running` experiments running or being submitted), the next experiment `pick_next` chooses:
   the highest priority first, then round-robin over users (the user whose last experiment started
   longest ago), never more than `max_running_per_user` for one user.

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

from orchestrator.service.db import FINAL_STATES, Experiment, database_id, transition, utcnow
from orchestrator.spec.schema import SpecError
from orchestrator.run.submit import connect, submit_spec

log = logging.getLogger(__name__)

RAY_FINAL_STATES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}
NEVER = datetime.min.replace(tzinfo=timezone.utc)
POLL_S = 2.0  # seconds between passes
JOB_PREFIX = "restorch-serve-"  # then the database id: restorch-serve-{database id}-{experiment id}


class ClusterJob(NamedTuple):
    status: str  # Ray's job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    end_time: datetime | None = None  # when it ended (None while it runs)


class Cluster(Protocol):
    def submit(self, experiment: Experiment, submission_id: str) -> None:
        """Start the experiment as the job `submission_id`; nothing new if the cluster has that job already."""

    def jobs(self) -> dict[str, ClusterJob]:
        """Every job the cluster knows, by id."""

    def stop(self, job_id: str) -> None:
        """Ask the job to stop (it ends STOPPED)."""


class RayCluster:
    """A Ray head's Jobs API (orchestrator/run/submit.py): an experiment runs `restorch <kind> <spec>` as a
    Ray job, with this checkout's code unless `installed`."""

    def __init__(self, address: str, *, installed: bool = False) -> None:
        self.address, self.installed = address, installed

    def submit(self, experiment: Experiment, submission_id: str) -> None:
        with tempfile.TemporaryDirectory(prefix="restorch-serve-") as folder:
            spec_file = Path(folder) / f"experiment-{experiment.id}.yaml"
            spec_file.write_text(experiment.spec)
            submit_spec(spec_file, kind=experiment.kind, address=self.address, installed=self.installed,
                        submission_id=submission_id)

    def jobs(self) -> dict[str, ClusterJob]:
        return {job.submission_id: ClusterJob(job.status.value, job.message or "", from_milliseconds(job.end_time))
                for job in connect(self.address).list_jobs() if job.submission_id}

    def stop(self, job_id: str) -> None:
        connect(self.address).stop_job(job_id)


def from_milliseconds(timestamp: int | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp / 1000, timezone.utc) if timestamp else None


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
        self._job_prefix: str | None = None

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
            except Exception as error:  # the cluster or the database failed this pass: keep serving, retry
                log.warning("dispatcher: %s: %s; retrying in %.0f s", type(error).__name__, error, POLL_S)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def tick(self) -> None:
        jobs = self.cluster.jobs()
        self.reconcile(jobs)
        self.dispatch(jobs)

    def job_prefix(self) -> str:
        """What the ids of this database's Ray jobs start with."""
        if self._job_prefix is None:
            self._job_prefix = f"{JOB_PREFIX}{database_id(self.sessions)}-"
        return self._job_prefix

    def reconcile(self, jobs: dict[str, ClusterJob]) -> None:
        """Finish the running experiments whose jobs ended (or vanished); stop this database's live jobs
        that no queued or running experiment owns."""
        live = [job_id for job_id, job in jobs.items()
                if job_id.startswith(self.job_prefix()) and job.status not in RAY_FINAL_STATES]
        with self.sessions() as session:
            running = session.scalars(select(Experiment).where(Experiment.status == "running")).all()
            owners = dict(session.execute(select(Experiment.ray_job_id, Experiment.status)
                                          .where(Experiment.ray_job_id.in_(live))).all())
        for experiment in running:
            job = jobs.get(experiment.ray_job_id)
            if job is None:
                message = f"the cluster has no job {experiment.ray_job_id} any more (was the cluster restarted?)"
                transition(self.sessions, experiment.id, "running", status="failed", message=message,
                           finished_at=utcnow())
            elif job.status in RAY_FINAL_STATES:
                transition(self.sessions, experiment.id, "running", status=RAY_FINAL_STATES[job.status],
                           message=job.message or None, finished_at=job.end_time or utcnow())
        for job_id in live:
            owner = owners.get(job_id)
            if owner is None or owner in FINAL_STATES:
                log.warning("dispatcher: stopping Ray job %s: %s", job_id,
                            f"its experiment is {owner}" if owner else "no experiment of this database has it")
                self.cluster.stop(job_id)

    def dispatch(self, jobs: dict[str, ClusterJob]) -> None:
        with self.sessions() as session:
            pending = session.scalars(select(Experiment).where(Experiment.status == "queued",
                                                               Experiment.ray_job_id.is_not(None))).all()
        for experiment in pending:
            self._start(experiment, jobs)
        while (experiment := self._next()) is not None:
            submission_id = f"{self.job_prefix()}{experiment.id}"
            if transition(self.sessions, experiment.id, "queued", ray_job_id=submission_id,
                          message=f"submitting Ray job {submission_id}"):
                experiment.ray_job_id = submission_id
                self._start(experiment, jobs)

    def _start(self, experiment: Experiment, jobs: dict[str, ClusterJob]) -> None:
        """Submit the experiment as its recorded job, unless the cluster has that job (adopted), and
        record it running."""
        job_id = experiment.ray_job_id
        if job_id not in jobs:
            try:
                self.cluster.submit(experiment, job_id)
            except SpecError as error:  # the spec cannot run as submitted: retrying would not help
                transition(self.sessions, experiment.id, "queued", status="failed", message=f"not submitted: {error}",
                           finished_at=utcnow())
                return
            except Exception as error:  # the cluster is unreachable or refused: the next pass submits it again
                transition(self.sessions, experiment.id, "queued",
                           message=f"waiting to be submitted: {type(error).__name__}: {error}")
                raise
        if not transition(self.sessions, experiment.id, "queued", status="running", message=None,
                          started_at=utcnow()):
            self.cluster.stop(job_id)  # cancelled while it was being submitted

    def _next(self) -> Experiment | None:
        with self.sessions() as session:
            active = session.scalars(select(Experiment).where(Experiment.status.in_(("queued", "running")))).all()
            last_started = dict(session.execute(select(Experiment.user, func.max(Experiment.started_at))
                                                .group_by(Experiment.user)).all())
        queued = [e for e in active if e.status == "queued" and e.ray_job_id is None]
        taken = [e for e in active if e.status == "running" or e.ray_job_id is not None]  # running or being submitted
        return pick_next(queued, taken, {user: t for user, t in last_started.items() if t is not None}, self.limits)
