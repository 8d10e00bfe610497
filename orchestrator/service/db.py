"""The database of `restorch serve` (SQLAlchemy 2): the experiment queue, the API tokens and the
database's own id (`database_id`).

SQLite by default (`sqlite:///restorch-service.db`), PostgreSQL for a team
(`postgresql+psycopg2://USER@HOST/DB`). Tables are created on first use. Everything the service
knows lives here, so a restarted service carries on where the last one stopped.

An experiment moves queued -> running -> succeeded | failed | cancelled (a queued one may also be
cancelled directly). State changes are conditional updates (`WHERE status = ...`), so the API and
the dispatcher never overwrite each other's change.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, Integer, String, Text, TypeDecorator, create_engine, update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DEFAULT_URL = "sqlite:///restorch-service.db"
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A UTC timestamp that comes back timezone-aware from every database (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # the restorch command the Ray job runs: train, sweep, ablate
    name: Mapped[str] = mapped_column(String(255))  # the spec's name
    storage: Mapped[str] = mapped_column(String(1024))  # the spec's storage.path
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    spec: Mapped[str] = mapped_column(Text)  # the validated spec as YAML, defaults filled in
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    # The Ray job's submission id, recorded while still queued, before the job is submitted (dispatcher.py)
    ray_job_id: Mapped[str | None] = mapped_column(String(255), default=None)
    message: Mapped[str | None] = mapped_column(Text, default=None)  # why it failed, or what is pending
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Token(Base):
    """An API token (orchestrator/service/auth.py): its public id and a salted hash of its secret part."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Setting(Base):
    """A fact about this database, by name (`database_id`)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


def open_database(url: str) -> sessionmaker[Session]:
    """Sessions on the database at `url` (its tables created if missing)."""
    # SQLite connections are shared by the API's worker threads and the dispatcher's thread.
    connect_args = {"check_same_thread": False} if url.startswith("sqlite") else {}
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


def transition(sessions: sessionmaker[Session], experiment_id: int, expected: str, **values: object) -> bool:
    """Set `values` on the experiment if its status is still `expected`; returns whether it was."""
    with sessions.begin() as session:
        done = session.execute(update(Experiment).where(Experiment.id == experiment_id, Experiment.status == expected)
                               .values(**values))
    return done.rowcount == 1


def database_id(sessions: sessionmaker[Session]) -> str:
    """This database's random id, made on first use: the Ray jobs of its experiments carry it
    (orchestrator/service/dispatcher.py), so services with databases of their own can share a cluster."""
    with sessions.begin() as session:
        setting = session.get(Setting, "database_id")
        if setting is None:
            setting = Setting(name="database_id", value=uuid.uuid4().hex[:8])
            session.add(setting)
    return setting.value
