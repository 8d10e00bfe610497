"""A sweep stored on an S3-compatible store (moto) is found by `restorch status`, `sweep --resume` and the
service's result pages through its `storage.endpoint_url` (they read S3 at AWS otherwise)."""
from __future__ import annotations

import yaml

from conftest import TINY_RESTORMER
from orchestrator.cli import main
from orchestrator.service.results import sweep_result
from orchestrator.spec.load import parse_spec
from workloads.storage import write_text
from orchestrator.run.sweep import SPEC_FILE, read_stored_spec
from servers import S3_ENV, moto_s3, s3_client


def test_status_resume_and_results_read_a_sweep_on_s3_with_its_endpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the spec's default tracking store: none here, so no MLflow states
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    with moto_s3() as endpoint:
        s3_client(endpoint).create_bucket(Bucket="team")
        raw = {"name": "on-s3", "model": TINY_RESTORMER, "task": "deraining",
               "data": {"train": "s3://team/rain/train", "val": "s3://team/rain/val"},
               "train": {"lr": {"grid": [1.0e-3, 2.0e-3]}},
               "storage": {"path": "s3://team/runs", "endpoint_url": endpoint}}
        spec = parse_spec(raw)
        write_text("s3://team/runs/on-s3", SPEC_FILE, yaml.safe_dump(spec.as_written()), endpoint)

        assert main(["status", "--storage", "s3://team/runs", "--endpoint-url", endpoint]) == 0
        assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["on-s3", "0"]
        stored = read_stored_spec("s3://team/runs/on-s3", endpoint)  # what `sweep --resume` runs
        assert stored.storage.endpoint_url == endpoint and stored.as_written() == spec.as_written()
        assert sweep_result(spec) == {"trials": [], "best": None}  # the service's result page
