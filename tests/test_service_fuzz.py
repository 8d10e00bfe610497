"""Every bad input to `restorch serve` gets a 4xx, never a 500, on SQLite and (slow) PostgreSQL:
the cases found by hand (issue 24) and schemathesis' requests over the OpenAPI schema."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis

from orchestrator.service.dispatcher import Limits
from orchestrator.service.app import MAX_BODY_BYTES
from test_service import Service, queue_db, spec  # noqa: F401 (queue_db: a fixture)
from test_spec import alias_bomb

FUZZ_EXAMPLES = 150


def bad_bodies(root: Path) -> dict[str, Any]:
    """Request bodies (JSON text) that must each get a 4xx."""
    good = spec("fuzz", root / "runs")

    def body(**changes: Any) -> str:
        return json.dumps({"kind": "train", "spec": {**good, **changes}})

    nested: Any = {}
    for _ in range(500):
        nested = {"x": nested}
    return {
        "YAML nested 500 deep": json.dumps({"kind": "train", "spec": "name: x\nmodel: " + "[" * 500 + "]" * 500}),
        "JSON spec nested 500 deep": body(model={**good["model"], "deep": nested}),
        "body nested 100000 deep": '{"kind": "train", "spec": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "lone surrogate in kind": '{"kind": "\\ud800", "spec": {}}',
        "lone surrogate in a value": body(name="x\ud800"),
        "300-character name": body(name="n" * 300),
        "1,100-character storage path": body(storage={"path": f"{root / 'runs'}/alice/{'p' * 1100}"}),
        "NUL in a data path": body(data={**good["data"], "train": "/data/rain/tr\x00ain"}),
        "NUL in the storage path": body(storage={"path": f"{root / 'runs'}/alice/a\x00b"}),
        "priority true": json.dumps({"kind": "train", "spec": good, "priority": True}),
        "priority 1e400": '{"kind": "train", "spec": {}, "priority": 1e400}',
        "spec a YAML list": json.dumps({"kind": "train", "spec": "- a\n- b"}),
        "control character in YAML": json.dumps({"kind": "sweep", "spec": "\x1f"}),
        "tab-indented YAML": json.dumps({"kind": "train", "spec": "name: x\n\tmodel: {}"}),
        "YAML alias to itself": json.dumps({"kind": "train", "spec": "name: x\nmodel: &m {name: restormer, sub: *m}"}),
        "body over the limit": json.dumps({"kind": "train", "spec": "#" * MAX_BODY_BYTES}),
    }


def test_bad_inputs_get_a_4xx(queue_db, tmp_path):
    service = Service(tmp_path, Limits(), queue_db)
    headers = {**service.headers["alice"], "Content-Type": "application/json"}
    for case, content in bad_bodies(tmp_path).items():
        response = service.client.post("/experiments", content=content, headers=headers)
        assert 400 <= response.status_code < 500, f"{case}: {response.status_code} {response.text[:300]}"
    long_data = {**spec("long-data", tmp_path / "runs"), "data": {"train": f"/data/{'d' * 1100}", "val": "/data/v"}}
    assert service.client.post("/experiments", json={"kind": "train", "spec": long_data},
                               headers=headers).status_code == 201  # long data paths are stored whole
    for params in ({"user": "a\x00b"}, {"user": "x" * 300}, {"status": "\x00"}, {"limit": "1e400"}):
        response = service.get("/experiments", "admin", **params)
        assert 400 <= response.status_code < 500, f"{params}: {response.status_code} {response.text[:300]}"
    for token in ("rst_a\x00b_c", f"rst_{'a' * 300}_c", "rst_0123456789ab_\x00"):
        response = service.client.get("/experiments", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, f"{token!r}: {response.status_code} {response.text[:300]}"
    assert [e["name"] for e in service.get("/experiments").json()] == ["long-data"]


def test_an_alias_bomb_is_refused_while_another_user_is_served(tmp_path):
    """A 7-level YAML alias bomb (10**7 values) is refused while composing; bob's submission, sent at the
    same time, is queued."""
    service = Service(tmp_path, Limits())
    answers: dict[str, Any] = {}

    def send(user: str, body: dict[str, Any]) -> None:
        answers[user] = service.client.post("/experiments", json=body, headers=service.headers[user])

    senders = [threading.Thread(target=send, args=("alice", {"kind": "train", "spec": alias_bomb(7)})),
               threading.Thread(target=send, args=("bob", {"kind": "train", "spec": spec("plain", tmp_path / "runs")}))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=120)
    assert answers["alice"].status_code == 422 and "more than 20000 values and keys" in answers["alice"].json()["detail"]
    assert answers["bob"].status_code == 201, answers["bob"].text


def test_fuzzed_requests_get_no_server_error(queue_db, tmp_path):
    """schemathesis: valid and invalid requests to every operation of the OpenAPI schema, as a user
    and as an admin, over a queue holding a few experiments (low ids, which generated ids often hit)."""
    fuzzed = Service(tmp_path, Limits(), queue_db)
    for index in range(3):
        fuzzed.submit("alice", f"fuzz-{index}")
    fuzzed.tick()
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)
    modes = schemathesis.GenerationMode  # valid requests, and requests the schema says are invalid
    cases = hypothesis.strategies.one_of([schema.as_strategy(generation_mode=mode) for mode in modes])
    statuses: list[int] = []

    @hypothesis.given(case=cases, caller=hypothesis.strategies.sampled_from(["alice", "admin"]))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case: Any, caller: str) -> None:
        response = case.call(headers=fuzzed.headers[caller])
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{case.as_curl_command()}\n{response.status_code} {response.text}"

    check()
    print(f"fuzz ({queue_db.split(':')[0]}): {len(statuses)} requests, statuses "
          f"{dict(sorted((code, statuses.count(code)) for code in set(statuses)))}")
