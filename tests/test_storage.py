"""Runs stored on S3 (moto's server on 127.0.0.1): the filesystem Ray gets, what an interrupted upload
leaves, and a training job whose checkpoints go to the bucket and that resumes from the bucket alone."""
from __future__ import annotations

import signal
import subprocess
import sys

import pyarrow.fs
import pytest
from botocore.exceptions import ClientError

from conftest import TINY_RESTORMER
from faults import crash
from orchestrator.spec.load import parse_spec
from workloads.storage import filesystem
from servers import S3_ENV, moto_s3, s3_client, wait_for

BUCKET = "restorch-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A boto3 client of the moto server, with the test credentials in the environment and an empty bucket."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    for upload in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
        client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=BUCKET)


def keys(client, prefix: str = "") -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_local_folders_and_s3_prefixes_map_to_a_filesystem_and_a_path(s3, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem("runs")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path / "runs")

    fs, path = filesystem(f"s3://{BUCKET}/runs", s3_endpoint)
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == f"{BUCKET}/runs"  # no s3:// with a filesystem
    with fs.open_output_stream(f"{path}/hello.txt") as out:
        out.write(b"hello")
    assert keys(s3) == ["runs/hello.txt"]

    with pytest.raises(ValueError, match="storage.endpoint_url"):  # the CLI prints it, exit 2
        filesystem(f"s3://{BUCKET}/runs", "127.0.0.1:9000")


WRITER = """
import os, sys
from workloads.storage import filesystem
fs, path = filesystem(sys.argv[1], sys.argv[2])
with fs.open_output_stream(path) as out:
    out.write(os.urandom(25 * 2**20))
    print("uploading", flush=True)
    sys.stdin.read()  # the file is never finished: the test kills this writer
"""


def uploaded_parts(client, key: str) -> int:
    """Parts uploaded so far to the unfinished multipart upload of `key` (0 if there is none)."""
    uploads = [u for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) if u["Key"] == key]
    return sum(len(client.list_parts(Bucket=BUCKET, Key=key, UploadId=u["UploadId"]).get("Parts", [])) for u in uploads)


def test_large_files_upload_in_parts_and_an_interrupted_upload_leaves_no_object(s3, s3_endpoint):
    fs, path = filesystem(f"s3://{BUCKET}/checkpoint/whole.bin", s3_endpoint)
    with fs.open_output_stream(path) as out:
        out.write(bytes(25 * 2**20))
    etag = s3.head_object(Bucket=BUCKET, Key="checkpoint/whole.bin")["ETag"]
    assert int(etag.strip('"').split("-")[1]) >= 2  # a multipart upload of two or more parts

    # A writer killed in the middle of a file, once parts of it went up: no object exists.
    writer = subprocess.Popen([sys.executable, "-c", WRITER, f"s3://{BUCKET}/checkpoint/cut.bin", s3_endpoint],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "uploading"
        wait_for(lambda: uploaded_parts(s3, "checkpoint/cut.bin") >= 2, timeout=120, what="the writer's first parts",
                 process=writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])] == ["checkpoint/cut.bin"]
    with pytest.raises(ClientError, match="404"):
        s3.head_object(Bucket=BUCKET, Key="checkpoint/cut.bin")


@pytest.fixture
def fresh_ray():
    """Ray started by the test itself (its workers inherit the S3 credentials set before it starts),
    and shut down after it."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_train_job_checkpoints_to_s3_and_resumes_from_s3_alone(s3, s3_endpoint, fresh_ray, derain_data, tmp_path):
    import ray
    from ray.train import TrainingFailedError

    from orchestrator.run.jobs import run_job

    spec = parse_spec({
        "name": "s3job", "model": TINY_RESTORMER, "task": "deraining",
        "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": 6, "val_every": 2, "checkpoint_every": 2, "log_every": 2, "max_failures": 0},
        "storage": {"path": f"s3://{BUCKET}/runs", "endpoint_url": s3_endpoint},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},  # the job's MLflow run, not in the working folder
    })
    # The first run fails at iteration 5: checkpoints 2 and 4 are committed.
    with pytest.raises(TrainingFailedError):
        run_job(spec, test_hook=crash(0, 5, tmp_path / "fault"))
    stored = keys(s3, "runs/s3job/")
    assert "runs/s3job/checkpoint_manager_snapshot.json" in stored
    for step in (2, 4):
        assert f"runs/s3job/checkpoint_{step:07d}/state/mp_rank_00_model_states.pt" in stored

    # An upload of checkpoint 6 that was cut off: a folder with some of the files, never committed.
    s3.copy_object(Bucket=BUCKET, Key="runs/s3job/checkpoint_0000006/rng_rank0.pt",
                   CopySource={"Bucket": BUCKET, "Key": "runs/s3job/checkpoint_0000004/rng_rank0.pt"})

    # A new Ray, nothing local: the second run finds its checkpoints in the bucket only.
    ray.shutdown()
    result, run_id = run_job(spec)
    assert result.metrics["resumed_from"] == 4  # the last committed checkpoint, not the partial folder
    assert result.metrics["iteration"] == 6
    assert result.metrics["checkpoint_path"] == f"s3://{BUCKET}/runs/s3job/checkpoint_0000006"
    assert "runs/s3job/checkpoint_0000006/model.pt" in keys(s3, "runs/s3job/checkpoint_0000006/")
    assert result.checkpoint.path == f"{BUCKET}/runs/s3job/checkpoint_0000006"
    # both runs of the job are one MLflow run, each iteration logged once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("s3job").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "iteration")) == [1, 2, 4, 5, 6]
