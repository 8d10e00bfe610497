"""FastAPI dependencies of the service's routes (orchestrator/service/app.py): what `create_app` keeps in
`app.state` (the queue's database, the policy, the dispatcher, the per-user validation slots, the Ray
dashboard's address), the caller a request's bearer token names, and the experiment a path names when
the caller may see it."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.service.auth import Caller, authenticate
from orchestrator.service.db import Experiment
from orchestrator.service.dispatcher import Dispatcher
from orchestrator.service.policy import ServicePolicy

MAX_ID = 2**63 - 1  # the largest id a database integer holds


class OnePerUser:
    """At most one validation per user at a time: a user cannot occupy the service's threads with specs."""

    def __init__(self) -> None:
        self._lock, self._busy = threading.Lock(), set[str]()

    @contextmanager
    def held(self, user: str) -> Iterator[None]:
        with self._lock:
            if user in self._busy:
                raise HTTPException(429, "your previous submission is still being validated; send this one after it")
            self._busy.add(user)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(user)


def database(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def policy(request: Request) -> ServicePolicy:
    return request.app.state.policy


def dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def validation_slots(request: Request) -> OnePerUser:
    return request.app.state.validating


def ray_dashboard(request: Request) -> str | None:
    return request.app.state.ray_address


Database = Annotated[sessionmaker[Session], Depends(database)]
Policy = Annotated[ServicePolicy, Depends(policy)]
AppDispatcher = Annotated[Dispatcher, Depends(dispatcher)]
ValidationSlots = Annotated[OnePerUser, Depends(validation_slots)]
RayDashboard = Annotated[str | None, Depends(ray_dashboard)]

bearer = HTTPBearer(auto_error=False, description="a token from `restorch serve token create USER`")


def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], sessions: Database) -> Caller:
    """Who sent the request; 401 without a valid token."""
    found = authenticate(sessions, credentials.credentials) if credentials else None
    if found is None:
        raise HTTPException(401, "a valid token is required: send `Authorization: Bearer <token>` "
                                 "(tokens come from `restorch serve token create USER`)",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


Who = Annotated[Caller, Depends(caller)]
ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID)]


def owned(experiment_id: ExperimentId, who: Who, sessions: Database) -> Experiment:
    """The experiment if the caller may see it (their own; any, for an admin); else 404, as if it did not exist."""
    with sessions() as session:
        experiment = session.get(Experiment, experiment_id)
    if experiment is None or not (who.admin or experiment.user == who.user):
        raise HTTPException(404, f"no experiment {experiment_id} (among yours)")
    return experiment


Owned = Annotated[Experiment, Depends(owned)]
