"""`restorch tracking up`: a shared MLflow server on a real PostgreSQL (Debian's, initialised here,
on 127.0.0.1) with its artifacts in S3 (moto's server on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.cli import main
from orchestrator.tracking.server import backend_uri
from servers import free_port, shared_tracking

BUCKET = "restorch-mlflow"

SECOND_CLIENT = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("shared")
(run,) = client.search_runs([experiment.experiment_id])
path = client.download_artifacts(run.info.run_id, "model/weights.txt", sys.argv[2])
version = client.get_model_version_by_alias("derain", "champion")
print(json.dumps({"run_id": run.info.run_id, "psnr": run.data.metrics["psnr"], "lr": run.data.params["lr"],
                  "artifact": open(path).read(), "version_run": version.run_id,
                  "artifact_uri": run.info.artifact_uri}))
"""


def test_postgres_uris_get_the_installed_driver():
    assert backend_uri("postgresql://u:p@db:5432/mlflow") == "postgresql+psycopg2://u:p@db:5432/mlflow"
    assert backend_uri("postgres://db/mlflow") == "postgresql+psycopg2://db/mlflow"
    assert backend_uri("postgresql+psycopg2://db/mlflow") == "postgresql+psycopg2://db/mlflow"
    assert backend_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.timeout(120)  # a hang guard, not a speed check: the connect check runs before any server starts
def test_a_database_that_is_down_fails_at_once_without_the_password(capsys):
    code = main(["tracking", "up", "--backend", f"postgresql://team:secret@127.0.0.1:{free_port()}/mlflow",
                 "--artifacts", "s3://bucket/mlflow"])
    assert code == 2
    error = capsys.readouterr().err
    assert "cannot connect" in error and "secret" not in error


@pytest.fixture(scope="module")
def shared_server():
    """PostgreSQL + moto S3 + `restorch tracking up`: yields (server URL, boto3 client of the bucket, backend URI)."""
    with shared_tracking(BUCKET) as (url, _, s3, backend):
        yield url, s3, backend


@pytest.mark.slow
def test_runs_artifacts_and_models_are_shared_through_the_server(shared_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    url, s3, backend = shared_server
    # The clients have no S3 credentials: artifacts travel through the server.
    client_env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_"))}

    client = MlflowClient(url)
    experiment_id = client.create_experiment("shared")
    run = client.create_run(experiment_id, run_name="trial-0")
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.0003")
    client.log_metric(run_id, "psnr", 31.5, step=100)
    (tmp_path / "weights.txt").write_text("trained weights")
    client.log_artifact(run_id, str(tmp_path / "weights.txt"), "model")
    client.set_terminated(run_id)
    client.create_registered_model("derain")
    version = client.create_model_version("derain", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("derain", "champion", version.version)

    second = subprocess.run([sys.executable, "-c", SECOND_CLIENT, url, str(tmp_path / "download")],
                            env=client_env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    seen = json.loads(second.stdout)
    assert seen["run_id"] == run_id and seen["psnr"] == 31.5 and seen["lr"] == "0.0003"
    assert seen["artifact"] == "trained weights" and seen["version_run"] == run_id
    assert seen["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied by the server

    # Where it all is: the artifact in the bucket, the run in PostgreSQL.
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    assert f"mlflow/{experiment_id}/{run_id}/artifacts/model/weights.txt" in keys
    import sqlalchemy

    with sqlalchemy.create_engine(backend).connect() as connection:
        stored = connection.execute(sqlalchemy.text("SELECT name, status FROM runs WHERE run_uuid = :id"), {"id": run_id})
        assert stored.one() == ("trial-0", "FINISHED")
    assert mlflow.__version__.startswith("3.")
