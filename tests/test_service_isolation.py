"""`restorch serve` keeps its users apart and never acts on an address a spec names (issue 24).

Fast tests run the app in this process (test_service.Service: FakeCluster, SQLite); the slow one runs
`restorch serve` as a process with a tracking server that never answers.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from orchestrator.service.auth import authenticate, create_token, list_tokens
from orchestrator.cli import main
from orchestrator.service.dispatcher import Limits
from orchestrator.service.db import Experiment, open_database
from servers import BIN, answers, free_port, started, wait_for
from test_service import Service, bearer, spec


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path, Limits())


def post(service: Service, user: str, body: dict[str, Any]) -> Any:
    """POST the body as JSON text (a lone surrogate written as its escape, as any client may send it)."""
    return service.client.post("/experiments", content=json.dumps(body),
                               headers={**service.headers[user], "Content-Type": "application/json"})


@contextmanager
def silent_listener() -> Iterator[socket.socket]:
    """A TCP port on 127.0.0.1 that takes connections (the kernel completes them) and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def connected(listener: socket.socket) -> bool:
    """Whether anything has connected to the listener (a connection waits to be accepted)."""
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_each_user_stores_in_their_own_prefix_whatever_the_spelling(service):
    runs = service.root / "runs"
    alice = service.submit("alice", "shared")
    stored = yaml.safe_load(service.get(f"/experiments/{alice['id']}", "alice").json()["spec"])
    assert stored["storage"]["path"] == str(runs / "alice")
    spellings = [f"{runs}/alice/", f"/{runs}/alice", f"{runs}/./alice", f"{runs}/x/../alice", f"file://{runs}/alice",
                 f"{runs}/bob/../alice", f"{runs}/alice/deeper", f"{runs}/..", "/", "/etc", "/root/.ssh", "shared/",
                 "s3://bucket/alice", f"{runs}/alice?x=1"]
    for storage in spellings:
        body = {"kind": "train", "spec": {**spec("shared", runs), "storage": {"path": storage, "shared": True}}}
        refused = post(service, "bob", body)
        assert refused.status_code == 422 and refused.json()["detail"].startswith("storage.path:"), (storage, refused.text)
    bob = service.submit("bob", "shared")  # the same name in his own prefix: no clash, no access to alice's
    stored = yaml.safe_load(service.get(f"/experiments/{bob['id']}", "bob").json()["spec"])
    assert stored["storage"]["path"] == str(runs / "bob")
    deeper = {**spec("deeper", runs), "storage": {"path": f"//{runs}/./bob/team/"}}
    assert yaml.safe_load(service.get(f"/experiments/{post(service, 'bob', {'kind': 'train', 'spec': deeper}).json()['id']}",
                                      "bob").json()["spec"])["storage"]["path"] == str(runs / "bob" / "team")


def test_the_409_names_only_the_callers_own_name(service):
    service.submit("alice", "taken")
    again = post(service, "alice", {"kind": "train", "spec": spec("taken", service.root / "runs")})
    assert again.status_code == 409
    assert again.json()["detail"] == ("the name 'taken' is taken by one of your experiments that is queued or running; "
                                      "rename this one")


@pytest.mark.parametrize("change, refusal", [
    ({"data": {"train": "/etc/shadow", "val": "/data/rain/val"}}, "data.train: /etc/shadow is outside the data folders"),
    ({"data": {"train": "/data/../etc/shadow", "val": "/data/rain/val"}}, "data.train: /data/../etc/shadow is outside"),
    ({"data": {"train": "/data/rain/train", "val": {"a": "file:///etc"}}}, "data.val.a: file:///etc is outside"),
    ({"data": {"train": "http://169.254.169.254/latest", "val": "/data/v"}}, "data.train: http://169.254.169.254/latest is outside"),
    ({"data": {"train": "/data/rain/train", "val": "/data/rain/val", "cache_dir": "/etc"}}, "data.cache_dir:"),
    ({"storage": {"path": "s3://bucket/x", "endpoint_url": "http://169.254.169.254"}}, "storage.endpoint_url: this service"),
])
def test_data_and_endpoints_outside_the_service_are_refused(service, change, refusal):
    body = {"kind": "train", "spec": {**spec("outside", service.root / "runs"), **change}}
    refused = post(service, "alice", body)
    assert refused.status_code == 422 and refusal in refused.json()["detail"], refused.text
    assert service.get("/experiments").json() == []


def test_a_spec_tracking_uri_is_refused_and_never_opened(tmp_path):
    """A tracking URI the service does not serve is refused at submission: the service neither connects to
    a listener that never answers nor creates a SQLite file the spec names (issue 24, case 1)."""
    with silent_listener() as listener:
        hung = f"http://127.0.0.1:{listener.getsockname()[1]}"
        service = Service(tmp_path, Limits(), tracking=("http://127.0.0.1:1",))
        database = tmp_path / "elsewhere" / "mlflow.db"
        for uri in (hung, f"sqlite:///{database}", f"file://{tmp_path}/mlruns", "http://169.254.169.254/"):
            for kind in ("ablate", "sweep", "train"):
                changes = {"tracking": {"uri": uri}}
                if kind == "ablate":
                    changes["ablation"] = {"profile_only": True, "factors": {"dim": [{"label": "d16", "set": {"model.dim": 16}}]}}
                elif kind == "sweep":
                    changes["train"] = {"iterations": 4, "val_every": 4, "checkpoint_every": 4, "lr": {"grid": [1e-3, 2e-3]}}
                refused = post(service, "alice", {"kind": kind, "spec": {**spec("tracked", tmp_path / "runs"), **changes}})
                assert refused.status_code == 422 and refused.json()["detail"].startswith("tracking.uri:"), refused.text
        # a spec without tracking.uri logs to the service's server
        ablation = {"profile_only": True, "factors": {"dim": [{"label": "d16", "set": {"model.dim": 16}}]}}
        queued = service.submit("alice", "tracked", kind="ablate", ablation=ablation)
        stored = yaml.safe_load(service.get(f"/experiments/{queued['id']}", "alice").json()["spec"])
        assert stored["tracking"]["uri"] == "http://127.0.0.1:1"
        assert not connected(listener)
    assert not database.parent.exists()


def test_result_pages_refuse_a_stored_spec_outside_the_policy(tmp_path):
    """An experiment queued before the policy (or by hand) whose spec names a tracking store and storage of
    its own: its result and report pages read neither."""
    with silent_listener() as listener:
        service = Service(tmp_path, Limits(), tracking=("http://127.0.0.1:1",))
        database = tmp_path / "elsewhere" / "mlflow.db"
        for name, uri in (("hung", f"http://127.0.0.1:{listener.getsockname()[1]}"), ("file", f"sqlite:///{database}")):
            written = {**spec(name, tmp_path / "elsewhere"), "tracking": {"uri": uri},
                       "ablation": {"profile_only": True, "factors": {"dim": [{"label": "d16", "set": {"model.dim": 16}}]}}}
            with service.sessions.begin() as session:
                experiment = Experiment(user="alice", kind="ablate", name=name, storage=str(tmp_path / "elsewhere"),
                                        spec=yaml.safe_dump(written), status="running", ray_job_id="job-x")
                session.add(experiment)
            report = service.get(f"/experiments/{experiment.id}/report", "alice")
            assert report.status_code == 503 and "outside alice's storage" in report.json()["detail"], report.text
            shown = service.get(f"/experiments/{experiment.id}", "alice").json()
            assert shown["result"] is None and "outside alice's storage" in shown["result_error"]
        assert not connected(listener)
    assert not database.exists()


def test_bad_values_get_a_4xx(service):
    good = spec("values", service.root / "runs")
    for body in ({"kind": "train", "spec": good, "priority": True}, {"kind": "train", "spec": good, "priority": "1"},
                 {"kind": "\ud800", "spec": good}, {"kind": "train", "spec": {**good, "name": "a\ud800"}}):
        refused = post(service, "alice", body)
        assert refused.status_code == 422, (body, refused.text)
    assert service.get("/experiments", "admin", user="bob\n").status_code == 422
    assert service.get("/experiments").json() == []


def test_a_token_in_the_url_is_refused(service):
    token = service.headers["alice"]["Authorization"].split()[1]
    for params in ({"token": token}, {"access_token": token}, {"q": token}):
        refused = service.client.get("/experiments", params=params)
        assert refused.status_code == 400 and "Authorization header" in refused.json()["detail"]


def test_tokens_are_listed_and_revoked(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    sessions = open_database(url)
    with pytest.raises(ValueError, match="lower-case letters"):
        create_token(sessions, "bob\n")
    assert main(["serve", "token", "create", "Bob", "--db", url]) == 2
    assert main(["serve", "--db", url, "token", "create", "carol"]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    create_token(sessions, "dave", admin=True)
    assert main(["serve", "token", "list", "--db", url]) == 0
    listed = capsys.readouterr().out
    assert "carol" in listed and "dave (admin)" in listed and token.split("_")[2] not in listed
    assert authenticate(sessions, token) is not None
    assert main(["serve", "token", "revoke", token.split("_")[1], "--db", url]) == 0
    assert authenticate(sessions, token) is None and [t.user for t in list_tokens(sessions)] == ["dave"]
    assert main(["serve", "token", "revoke", token.split("_")[1], "--db", url]) == 2


@pytest.mark.slow
def test_a_silent_tracking_server_holds_one_request_and_times_out(tmp_path):
    """`restorch serve` whose own tracking server never answers: a report page waits on it (MLflow's
    timeout, set by the service) while other users' requests are served; a token sent in the URL is
    refused and not written to the access log."""
    db = f"sqlite:///{tmp_path / 'queue.db'}"
    sessions = open_database(db)
    alice, bob = create_token(sessions, "alice"), create_token(sessions, "bob")
    runs = tmp_path / "runs"
    written = {**spec("held", runs), "storage": {"path": str(runs / "alice"), "shared": True},
               "ablation": {"profile_only": True, "factors": {"dim": [{"label": "d16", "set": {"model.dim": 16}}]}}}
    port, log = free_port(), tmp_path / "serve.log"
    with silent_listener() as listener:
        tracking = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with sessions.begin() as session:  # running (the cluster is unreachable: it stays so)
            experiment = Experiment(user="alice", kind="ablate", name="held", storage=str(runs / "alice"),
                                    spec=yaml.safe_dump({**written, "tracking": {"uri": tracking}}), status="running",
                                    ray_job_id="job-held")
            session.add(experiment)
        command = [str(BIN / "restorch"), "serve", "--db", db, "--ray-address", f"http://127.0.0.1:{free_port()}",
                   "--port", str(port), "--storage-root", str(runs), "--data-root", "/data", "--tracking-uri", tracking]
        url = f"http://127.0.0.1:{port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_HTTP")}
        with started(command, env=env, log=log, marker=db) as process:
            wait_for(lambda: answers(f"{url}/openapi.json"), timeout=180, what="restorch serve", process=process, log=log)
            answer: dict[str, Any] = {}
            held = threading.Thread(target=lambda: answer.update(report=requests.get(
                f"{url}/experiments/{experiment.id}/report", headers=bearer(alice), timeout=300)))
            held.start()
            listener.setblocking(True)
            listener.settimeout(120)
            connection, _ = listener.accept()  # the report is waiting on the tracking server now
            others = requests.get(f"{url}/experiments", headers=bearer(bob), timeout=60)
            assert others.status_code == 200 and others.json() == []
            assert held.is_alive()
            in_url = requests.get(f"{url}/experiments", params={"token": bob}, timeout=60)
            assert in_url.status_code == 400
            held.join(timeout=240)  # MLflow gives up (the service's timeout), the page says why
            connection.close()
            assert answer["report"].status_code == 503, answer["report"].text
            assert "could not read the report" in answer["report"].json()["detail"]
    logged = log.read_text()
    assert "GET /experiments" in logged and bob.split("_")[2] not in logged and "token=<redacted>" in logged


def test_a_user_validates_one_spec_at_a_time(service, monkeypatch):
    """While alice's first spec is being validated, her second gets 429 and bob's is served."""
    from orchestrator.service import app as service_module

    entered, release = threading.Event(), threading.Event()
    parse = service_module.parse_spec

    def held_parse(raw: Any, **kwargs: Any) -> Any:
        if raw["name"] == "first":
            entered.set()
            release.wait(timeout=120)
        return parse(raw, **kwargs)

    monkeypatch.setattr(service_module, "parse_spec", held_parse)
    answers: dict[str, Any] = {}
    first = threading.Thread(target=lambda: answers.update(
        first=post(service, "alice", {"kind": "train", "spec": spec("first", service.root / "runs")})))
    first.start()
    assert entered.wait(timeout=120)
    second = post(service, "alice", {"kind": "train", "spec": spec("second", service.root / "runs")})
    assert second.status_code == 429 and "still being validated" in second.json()["detail"]
    assert post(service, "bob", {"kind": "train", "spec": spec("other", service.root / "runs")}).status_code == 201
    release.set()
    first.join(timeout=120)
    assert answers["first"].status_code == 201
