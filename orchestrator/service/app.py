"""`restorch serve`: an authenticated experiment queue in front of a Ray cluster (HTTP, FastAPI).

    POST /experiments                {"kind": "train|sweep|ablate", "spec": YAML text or JSON, "priority": 0}
    GET  /experiments?user=&status=  experiments, newest first (a user's own; an admin's: anyone's)
    GET  /experiments/{id}           state, Ray job, results so far, links
    POST /experiments/{id}/cancel    a queued one is cancelled; a running one's Ray job is stopped
    GET  /experiments/{id}/report    a sweep's (or ablation's) report files, once written
    GET  /openapi.json               the API schema (interactive: /docs)

Every request carries `Authorization: Bearer <token>` (orchestrator/service/auth.py): 401 without a valid
one; a token in the URL (`?token=`) is refused. A user sees and cancels only their own experiments
(another's is 404, as if it did not exist) unless the token is an admin's. A spec is data only (JSON,
or YAML read by the spec's bounded loader) and is validated as `restorch submit` validates it, then
held to the service's policy (orchestrator/service/policy.py: storage in the user's own prefix,
data in the data roots, the service's tracking servers) in `validate_submission`: a bad one gets 422
with the message naming the problem and nothing is queued. Every bad input is a 4xx: request bodies
over MAX_BODY_BYTES get 413, a user's second submission while their first is still being validated
429, and what the database cannot hold (a NUL, a lone surrogate, names and paths longer than its
columns) 422.

The queue is the database (orchestrator/service/db.py); the dispatcher thread (orchestrator/service/
dispatcher.py) submits queued experiments as Ray jobs and follows them; results are read from the
experiment's folder in the service's storage and its MLflow server (orchestrator/service/results.py),
never from an address a spec names. Endpoints are sync functions (FastAPI runs them in its thread
pool), so a slow read holds one thread, not the event loop; MLflow calls have a timeout (MLFLOW_LIMITS).

The routes are in two routers, `experiments` and `reports`; what they need (the database, the policy,
the dispatcher, the caller, the experiment a path names) comes as FastAPI dependencies
(orchestrator/service/dependencies.py) from what `create_app` keeps in `app.state`. `create_app`
assembles the routers with the app-wide parts: the token-in-URL guard, ASCII JSON errors and the
dispatcher's lifespan.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.run.remote import check_for_cluster
from orchestrator.run.submit import KINDS
from orchestrator.service.auth import USER_PATTERN
from orchestrator.service.db import FINAL_STATES, Experiment, transition, utcnow
from orchestrator.service.dependencies import (AppDispatcher, Database, OnePerUser, Owned, Policy, RayDashboard,
                                               ValidationSlots, Who, owned)
from orchestrator.service.dispatcher import Cluster, Dispatcher, Limits
from orchestrator.service.policy import ServicePolicy
from orchestrator.service.results import experiment_folder, jsonable, report_files, sweep_result, train_result
from orchestrator.spec.load import check_trial_limit, load_spec_text, parse_spec, spec_values
from orchestrator.spec.schema import MAX_SPEC_BYTES, ExperimentSpec, SpecError

MAX_BODY_BYTES = 1024 * 1024
# The service's own MLflow calls (result pages): a tracking server that does not answer costs a request 10 s, not minutes.
MLFLOW_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
URL_TOKEN_PARAMS = ("token", "access_token", "api_key", "apikey", "auth", "authorization", "key")
TOKEN_TEXT = re.compile(r"rst_[A-Za-z0-9_-]+|((?:access_)?token|api_?key|auth(?:orization)?|key)=[^&\s]*", re.IGNORECASE)
State = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped and non-finite numbers null: a lone surrogate or an `inf`
    echoed from a request cannot fail the response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(jsonable(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class RedactTokens(logging.Filter):
    """Drops token-like text (rst_..., token=...) from uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(TOKEN_TEXT.sub(lambda m: f"{m.group(1)}=<redacted>" if m.group(1) else "<redacted>",
                                               arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


class ExperimentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal[KINDS] = Field(description="the restorch command the Ray job runs")  # type: ignore[valid-type]
    spec: Annotated[str, Field(max_length=MAX_SPEC_BYTES)] | dict[str, Any] = Field(
        description="the experiment spec: YAML text, or the same as JSON data")
    priority: StrictInt = Field(0, ge=-1000, le=1000, description="higher runs first; equal priorities take turns by user")


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    user: str
    kind: str
    name: str
    priority: int
    status: State
    ray_job_id: str | None
    message: str | None = Field(description="why it failed, or what it waits for")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExperimentDetail(ExperimentOut):
    spec: str = Field(description="the validated spec as YAML, defaults filled in")
    result: dict[str, Any] | None = Field(
        description="train: the metrics reported with the latest checkpoint, and its location; "
                    "sweep/ablate: its trials and the best one (null before there is any)")
    result_error: str | None = Field(description="why the result could not be read (storage or MLflow unreachable)")
    links: dict[str, str] = Field(description="the Ray job in the cluster's dashboard; the MLflow server")


class Report(BaseModel):
    experiment: int
    folder: str = Field(description="the experiment's folder in its storage")
    files: dict[str, str] = Field(description="file name -> text: results.csv, best_spec.yaml; for an ablation also "
                                              "its paper-style table.csv, table.md, table.tex")


def check_storable(data: Any) -> None:
    """Refuse spec data (already within the spec's bounds on size and nesting) holding text the database
    cannot store: a NUL character, a lone surrogate (not UTF-8)."""
    for node, _ in spec_values(data):
        if isinstance(node, str):
            if "\0" in node:
                raise SpecError(f"spec: {node[:80]!r} holds a NUL character; remove it")
            try:
                node.encode()
            except UnicodeEncodeError:
                raise SpecError(f"spec: {node[:80]!r} holds a lone surrogate, which is not valid Unicode") from None


def check_lengths(spec: ExperimentSpec) -> None:
    """The name and storage fit the database's columns (PostgreSQL refuses longer values)."""
    for key, value, column in (("name", spec.name, Experiment.name), ("storage.path", spec.storage.path, Experiment.storage)):
        if len(value) > column.type.length:
            raise SpecError(f"{key}: {len(value)} characters, more than the {column.type.length} the service stores")


def validate_submission(body: ExperimentIn, policy: ServicePolicy, user: str) -> ExperimentSpec:
    """The spec of `user`'s submission, checked as the CLI checks it before anything runs, and held to the
    service's policy (storage in the user's prefix, allowed data and tracking); raises SpecError."""
    spec = load_spec_text(body.spec, "spec") if isinstance(body.spec, str) else parse_spec(body.spec, source="spec")
    check_storable(spec.as_written())
    tracked = body.kind != "train"
    spec = policy.admit(spec, user, tracked=tracked)
    check_lengths(spec)
    check_for_cluster(spec, tracked=tracked)
    if body.kind == "train" and spec.search_space:
        keys = ", ".join(domain.key for domain in spec.search_space)
        raise SpecError(f"spec has search-space entries ({keys}): submit it with kind sweep, or fix the values")
    if body.kind == "sweep":
        check_trial_limit(spec, yes=False)
    return spec


def stored_spec(experiment: Experiment, policy: ServicePolicy) -> ExperimentSpec:
    """The experiment's spec as queued, once more held to the policy: pages read only the service's storage."""
    spec = load_spec_text(experiment.spec, f"experiment {experiment.id}'s spec")
    policy.check_stored(spec, experiment.user)
    return spec


experiments = APIRouter(prefix="/experiments")


@experiments.post("", status_code=201, response_model=ExperimentOut)
def submit(body: ExperimentIn, who: Who, sessions: Database, policy: Policy, dispatcher: AppDispatcher,
           validating: ValidationSlots) -> Experiment:
    """Validate the spec and queue the experiment."""
    with validating.held(who.user):
        try:
            spec = validate_submission(body, policy, who.user)
        except SpecError as error:
            raise HTTPException(422, str(error)) from None
    with sessions.begin() as session:
        clash = session.scalars(select(Experiment.id).where(
            Experiment.name == spec.name, Experiment.storage == spec.storage.path,
            Experiment.status.in_(("queued", "running")))).first()
        if clash is not None:  # storage is the user's own prefix: the clash is one of their own experiments
            raise HTTPException(409, f"the name {spec.name!r} is taken by one of your experiments that is queued "
                                     "or running; rename this one")
        experiment = Experiment(user=who.user, kind=body.kind, name=spec.name, storage=spec.storage.path,
                                priority=body.priority, spec=yaml.safe_dump(spec.as_written(), sort_keys=False))
        session.add(experiment)
    dispatcher.wake()
    return experiment


@experiments.get("", response_model=list[ExperimentOut])
def list_experiments(who: Who, sessions: Database, user: str | None = None, status: State | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Sequence[Experiment]:
    """Experiments, newest first: the caller's own (an admin: everyone's, or `user`'s)."""
    if user is not None and not re.match(USER_PATTERN, user):
        raise HTTPException(422, f"user: {user[:80]!r} is not a user name (lower-case letters, digits, _ and -)")
    query = select(Experiment).order_by(Experiment.id.desc()).limit(limit)
    if not who.admin:
        query = query.where(Experiment.user == who.user)
    if user is not None:
        query = query.where(Experiment.user == user)
    if status is not None:
        query = query.where(Experiment.status == status)
    with sessions() as session:
        return session.scalars(query).all()


@experiments.get("/{experiment_id}", response_model=ExperimentDetail)
def show(experiment: Owned, policy: Policy, ray_address: RayDashboard) -> ExperimentDetail:
    """The experiment's state and what it has produced so far."""
    result, error, links = None, None, {}
    if ray_address and experiment.ray_job_id:
        links["ray_job"] = f"{ray_address}/#/jobs/{experiment.ray_job_id}"
    try:
        spec = stored_spec(experiment, policy)
        if spec.tracking.uri:
            links["mlflow"] = spec.tracking.uri
        if experiment.status != "queued":
            result = train_result(spec) if experiment.kind == "train" else sweep_result(spec)
    except Exception as failure:  # storage or MLflow unreachable, an unreadable spec: still return the state
        error = f"{type(failure).__name__}: {failure}"
    return ExperimentDetail(**ExperimentOut.model_validate(experiment).model_dump(), spec=experiment.spec,
                            result=result, result_error=error, links=links)


@experiments.post("/{experiment_id}/cancel", response_model=ExperimentOut)
def cancel(experiment: Owned, who: Who, sessions: Database, dispatcher: AppDispatcher) -> Experiment:
    """Cancel a queued experiment, or stop a running one's Ray job (it ends cancelled once stopped)."""
    if experiment.status in FINAL_STATES:
        raise HTTPException(409, f"experiment {experiment.id} has already ended: {experiment.status}")
    if not transition(sessions, experiment.id, "queued", status="cancelled", finished_at=utcnow(),
                      message="cancelled before it started"):
        experiment = owned(experiment.id, who, sessions)  # it started meanwhile
        if experiment.status == "running":
            try:
                dispatcher.cluster.stop(experiment.ray_job_id)
            except Exception as failure:  # the head is down or refused
                raise HTTPException(503, f"could not stop Ray job {experiment.ray_job_id}: "
                                         f"{type(failure).__name__}: {failure}") from None
            transition(sessions, experiment.id, "running",
                       message=f"stop requested: ends cancelled once Ray job {experiment.ray_job_id} has stopped")
    dispatcher.wake()
    return owned(experiment.id, who, sessions)


reports = APIRouter(prefix="/experiments")


@reports.get("/{experiment_id}/report", response_model=Report)
def report(experiment: Owned, policy: Policy) -> Report:
    """The report files of a sweep or ablation: 404 until it has written them."""
    if experiment.kind == "train":
        raise HTTPException(404, f"experiment {experiment.id} is a train job, which writes no report: "
                                 f"GET /experiments/{experiment.id} has its metrics")
    if experiment.status == "queued":
        raise HTTPException(404, f"experiment {experiment.id} has no report yet (queued): the {experiment.kind} "
                                 "writes it when it ends")
    try:
        spec = stored_spec(experiment, policy)
        folder, files = experiment_folder(spec), report_files(spec)
    except Exception as failure:  # storage or MLflow unreachable (OSError, MlflowException), a spec refused
        raise HTTPException(503, f"could not read the report of experiment {experiment.id}: {failure}") from None
    if not files:
        raise HTTPException(404, f"experiment {experiment.id} has no report yet ({experiment.status}): the "
                                 f"{experiment.kind} writes it into {folder} when it ends")
    return Report(experiment=experiment.id, folder=folder, files=files)


@asynccontextmanager
async def run_dispatcher(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifespan: its dispatcher runs while it is served."""
    app.state.dispatcher.start()
    yield
    app.state.dispatcher.stop()


def http_error(request: Request, error: StarletteHTTPException) -> Response:
    return AsciiJSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)


def invalid_request(request: Request, error: RequestValidationError) -> Response:
    return AsciiJSONResponse({"detail": jsonable_encoder(error.errors())}, 422)


async def no_token_in_url(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    if any(key.lower() in URL_TOKEN_PARAMS for key in request.query_params) or "rst_" in request.url.query:
        return AsciiJSONResponse({"detail": "tokens go in the Authorization header (Bearer), never in the URL, "
                                            "where logs and proxies keep them: revoke this one "
                                            "(restorch serve token revoke ID) and send a new one as a header"}, 400)
    return await call_next(request)


def create_app(sessions: sessionmaker[Session], cluster: Cluster, limits: Limits, policy: ServicePolicy, *,
               ray_address: str | None = None) -> FastAPI:
    """The API over the queue in `sessions`, admitting specs under `policy`; its dispatcher
    (app.state.dispatcher) runs while the app is served."""
    app = FastAPI(title="restorch", summary="experiment queue in front of a Ray cluster", lifespan=run_dispatcher,
                  max_body_size=MAX_BODY_BYTES, default_response_class=AsciiJSONResponse)
    app.state.sessions, app.state.policy, app.state.ray_address = sessions, policy, ray_address
    app.state.dispatcher, app.state.validating = Dispatcher(sessions, cluster, limits), OnePerUser()
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.middleware("http")(no_token_in_url)
    app.include_router(experiments)
    app.include_router(reports)
    return app


def serve(db_url: str, ray_address: str, limits: Limits, policy: ServicePolicy, *, host: str, port: int,
          installed: bool = False) -> None:
    """Run the service in the foreground until interrupted (the queue and running jobs survive)."""
    import uvicorn

    from orchestrator.service.dispatcher import RayCluster
    from orchestrator.service.db import open_database

    for name, value in MLFLOW_LIMITS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    cluster = RayCluster(ray_address, installed=installed)
    app = create_app(open_database(db_url), cluster, limits, policy, ray_address=ray_address)
    print(f"restorch serve: http://{host}:{port} (API docs at /docs), queue in {db_url}, Ray jobs on {ray_address}; "
          f"storage in {', '.join(policy.storage_roots)}, data from {', '.join(policy.data_roots) or 'nowhere'}, "
          f"tracking on {', '.join(policy.tracking_uris) or 'none'}", flush=True)
    uvicorn.run(app, host=host, port=port)
