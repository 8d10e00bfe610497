"""`restorch serve`: an authenticated experiment queue in front of a Ray cluster (HTTP, FastAPI).

    POST /experiments                {"kind": "train|sweep|ablate", "spec": YAML text or JSON, "priority": 0}
    GET  /experiments?user=&status=  experiments, newest first (a user's own; an admin's: anyone's)
    GET  /experiments/{id}           state, Ray job, results so far, links
    POST /experiments/{id}/cancel    a queued one is cancelled; a running one's Ray job is stopped
    GET  /experiments/{id}/report    a sweep's (or ablation's) report files, once written
    GET  /openapi.json               the API schema (interactive: /docs)

Every request carries `Authorization: Bearer <token>` (orchestrator/auth.py): 401 without a valid
one. A user sees and cancels only their own experiments (another's is 404, as if it did not exist)
unless the token is an admin's. A spec is data only (JSON, or YAML read with yaml.safe_load) and is
validated as `restorch submit` validates it (`validate_submission`): a bad one gets 422 with the
spec checker's message and nothing is queued. Request bodies over MAX_BODY_BYTES get 413.

The queue is the database (orchestrator/service_db.py); the dispatcher thread (orchestrator/
dispatcher.py) submits queued experiments as Ray jobs and follows them; results are read from the
experiment's storage folder and MLflow (orchestrator/service_results.py).
"""
# No `from __future__ import annotations`: FastAPI reads the annotations of the routes defined in
# create_app, which name its local types (Who, ExperimentId).
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import yaml
from fastapi import Depends, FastAPI, HTTPException, Path, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.auth import Caller, authenticate
from orchestrator.dispatcher import Cluster, Dispatcher, Limits
from orchestrator.remote import check_for_cluster
from orchestrator.service_db import FINAL_STATES, Experiment, transition, utcnow
from orchestrator.service_results import experiment_folder, report_files, sweep_result, train_result
from orchestrator.spec import ExperimentSpec, SpecError, check_trial_limit, parse_spec
from orchestrator.submit import KINDS

MAX_BODY_BYTES = 1024 * 1024
MAX_ID = 2**63 - 1  # the largest id a database integer holds
State = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ExperimentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal[KINDS] = Field(description="the restorch command the Ray job runs")  # type: ignore[valid-type]
    spec: str | dict[str, Any] = Field(description="the experiment spec: YAML text, or the same as JSON data")
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; equal priorities take turns by user")


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


def validate_submission(body: ExperimentIn) -> ExperimentSpec:
    """The spec of a submission, checked as the CLI checks it before anything runs; raises SpecError."""
    raw = body.spec
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise SpecError(f"spec is not valid YAML: {error}") from None
    spec = parse_spec(raw, source="spec")
    check_for_cluster(spec, tracked=body.kind != "train")
    if body.kind == "train" and spec.search_space:
        keys = ", ".join(domain.key for domain in spec.search_space)
        raise SpecError(f"spec has search-space entries ({keys}): submit it with kind sweep, or fix the values")
    if body.kind == "sweep":
        check_trial_limit(spec, yes=False)
    return spec


def create_app(sessions: sessionmaker[Session], cluster: Cluster, limits: Limits, *,
               ray_address: str | None = None) -> FastAPI:
    """The API over the queue in `sessions`; its dispatcher (app.state.dispatcher) runs while the app is served."""
    dispatcher = Dispatcher(sessions, cluster, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher.start()
        yield
        dispatcher.stop()

    app = FastAPI(title="restorch", summary="experiment queue in front of a Ray cluster", lifespan=lifespan,
                  max_body_size=MAX_BODY_BYTES)
    app.state.dispatcher = dispatcher
    bearer = HTTPBearer(auto_error=False, description="a token from `restorch serve token create USER`")

    def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
        found = authenticate(sessions, credentials.credentials) if credentials else None
        if found is None:
            raise HTTPException(401, "a valid token is required: send `Authorization: Bearer <token>` "
                                     "(tokens come from `restorch serve token create USER`)",
                                headers={"WWW-Authenticate": "Bearer"})
        return found

    Who = Annotated[Caller, Depends(caller)]
    ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID)]

    def owned(experiment_id: int, who: Caller) -> Experiment:
        with sessions() as session:
            experiment = session.get(Experiment, experiment_id)
        if experiment is None or not (who.admin or experiment.user == who.user):
            raise HTTPException(404, f"no experiment {experiment_id} (among yours)")
        return experiment

    @app.post("/experiments", status_code=201, response_model=ExperimentOut)
    def submit(body: ExperimentIn, who: Who) -> Experiment:
        """Validate the spec and queue the experiment."""
        try:
            spec = validate_submission(body)
        except SpecError as error:
            raise HTTPException(422, str(error)) from None
        with sessions.begin() as session:
            clash = session.scalars(select(Experiment.id).where(
                Experiment.name == spec.name, Experiment.storage == spec.storage.path,
                Experiment.status.in_(("queued", "running")))).first()
            if clash is not None:
                raise HTTPException(409, f"an experiment named {spec.name!r} with storage {spec.storage.path} is "
                                         "already queued or running; both would run the same job: rename this one")
            experiment = Experiment(user=who.user, kind=body.kind, name=spec.name, storage=spec.storage.path,
                                    priority=body.priority, spec=yaml.safe_dump(spec.as_written(), sort_keys=False))
            session.add(experiment)
        dispatcher.wake()
        return experiment

    @app.get("/experiments", response_model=list[ExperimentOut])
    def list_experiments(who: Who, user: str | None = None, status: State | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Sequence[Experiment]:
        """Experiments, newest first: the caller's own (an admin: everyone's, or `user`'s)."""
        query = select(Experiment).order_by(Experiment.id.desc()).limit(limit)
        if not who.admin:
            query = query.where(Experiment.user == who.user)
        if user is not None:
            query = query.where(Experiment.user == user)
        if status is not None:
            query = query.where(Experiment.status == status)
        with sessions() as session:
            return session.scalars(query).all()

    @app.get("/experiments/{experiment_id}", response_model=ExperimentDetail)
    def show(experiment_id: ExperimentId, who: Who) -> ExperimentDetail:
        """The experiment's state and what it has produced so far."""
        experiment = owned(experiment_id, who)
        result, error, links = None, None, {}
        if ray_address and experiment.ray_job_id:
            links["ray_job"] = f"{ray_address}/#/jobs/{experiment.ray_job_id}"
        try:
            spec = parse_spec(yaml.safe_load(experiment.spec))
            if (spec.tracking.uri or "").startswith(("http://", "https://")):
                links["mlflow"] = spec.tracking.uri
            if experiment.status != "queued":
                result = train_result(spec) if experiment.kind == "train" else sweep_result(spec)
        except Exception as failure:  # storage or MLflow unreachable, an unreadable spec: still return the state
            error = f"{type(failure).__name__}: {failure}"
        return ExperimentDetail(**ExperimentOut.model_validate(experiment).model_dump(), spec=experiment.spec,
                                result=result, result_error=error, links=links)

    @app.post("/experiments/{experiment_id}/cancel", response_model=ExperimentOut)
    def cancel(experiment_id: ExperimentId, who: Who) -> Experiment:
        """Cancel a queued experiment, or stop a running one's Ray job (it ends cancelled once stopped)."""
        experiment = owned(experiment_id, who)
        if experiment.status in FINAL_STATES:
            raise HTTPException(409, f"experiment {experiment_id} has already ended: {experiment.status}")
        if not transition(sessions, experiment_id, "queued", status="cancelled", finished_at=utcnow(),
                          message="cancelled before it started"):
            experiment = owned(experiment_id, who)  # it started meanwhile
            if experiment.status == "running":
                try:
                    cluster.stop(experiment.ray_job_id)
                except Exception as failure:  # the head is down or refused
                    raise HTTPException(503, f"could not stop Ray job {experiment.ray_job_id}: "
                                             f"{type(failure).__name__}: {failure}") from None
                transition(sessions, experiment_id, "running",
                           message=f"stop requested: ends cancelled once Ray job {experiment.ray_job_id} has stopped")
        dispatcher.wake()
        return owned(experiment_id, who)

    @app.get("/experiments/{experiment_id}/report", response_model=Report)
    def report(experiment_id: ExperimentId, who: Who) -> Report:
        """The report files of a sweep or ablation: 404 until it has written them."""
        experiment = owned(experiment_id, who)
        if experiment.kind == "train":
            raise HTTPException(404, f"experiment {experiment_id} is a train job, which writes no report: "
                                     f"GET /experiments/{experiment_id} has its metrics")
        try:
            spec = parse_spec(yaml.safe_load(experiment.spec))
            folder, files = experiment_folder(spec), report_files(spec)
        except (OSError, SpecError) as failure:  # storage unreachable, or a spec this version no longer reads
            raise HTTPException(503, f"could not read the report of experiment {experiment_id}: {failure}") from None
        if not files:
            raise HTTPException(404, f"experiment {experiment_id} has no report yet ({experiment.status}): the "
                                     f"{experiment.kind} writes it into {folder} when it ends")
        return Report(experiment=experiment_id, folder=folder, files=files)

    return app


def serve(db_url: str, ray_address: str, limits: Limits, *, host: str, port: int, installed: bool = False) -> None:
    """Run the service in the foreground until interrupted (the queue and running jobs survive)."""
    import uvicorn

    from orchestrator.dispatcher import RayCluster
    from orchestrator.service_db import open_database

    cluster = RayCluster(ray_address, installed=installed)
    app = create_app(open_database(db_url), cluster, limits, ray_address=ray_address)
    print(f"restorch serve: http://{host}:{port} (API docs at /docs), queue in {db_url}, Ray jobs on {ray_address}",
          flush=True)
    uvicorn.run(app, host=host, port=port)
