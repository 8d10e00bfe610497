"""What a spec needs to run on a Ray cluster of several nodes (`--address`, `restorch submit`, `restorch serve`).

Every node reads the spec's paths and writes to its storage and tracking store, so each must mean the
same thing on every node:
- data paths: absolute, or URIs (s3://...);
- storage: an s3:// (or other URI) prefix, or a folder every node mounts, declared `storage.shared: true`
  (NFS): a plain local folder would leave each node's checkpoints on that node's disk;
- tracking (sweeps and ablations log to MLflow): an http(s) tracking server or Databricks. A SQLite
  database or a `file:` store is a file on one node: a worker elsewhere would create an empty one at
  the same path and lose its runs. That holds even on a shared folder (SQLite over NFS corrupts).

The job's environment carries what the nodes need to reach them (`forwarded_env`): the MLflow tracking
URI and credentials, the S3 endpoint and the AWS credentials of the process that submits, when set.
"""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.spec.schema import ExperimentSpec, SpecError

SHARED_TRACKING_SCHEMES = ("http://", "https://", "databricks")
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
)
TRACKING_FIX = ("run a shared tracking server (`restorch tracking up --backend postgresql://... --artifacts "
                "s3://BUCKET/mlflow --host 0.0.0.0`, clusters/README.md) and set tracking.uri: http://HOST:5000 "
                "(or $MLFLOW_TRACKING_URI)")


def forwarded_env() -> dict[str, str]:
    """The variables of FORWARDED_ENV set here: what the job's processes on other nodes need too."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def check_for_cluster(spec: ExperimentSpec, *, tracked: bool) -> None:
    """Refuse, before anything runs, a spec whose paths, storage or (if `tracked`: sweeps, ablations)
    tracking store would not be the same on every node of a cluster."""
    for key, path in spec.data.folders().items():
        if "://" not in path and not Path(path).is_absolute():
            raise SpecError(f"{key}: {path} is relative, but the job runs on the cluster; give the dataset's "
                            "absolute path on the cluster's nodes, or an s3:// URI")
    storage = spec.storage.path
    if "://" not in storage and not spec.storage.shared:
        raise SpecError(f"storage.path: {storage} is a local folder, but the job runs on the nodes of a cluster, each "
                        "with its own disk; give an s3:// prefix (storage: {path: s3://BUCKET/restorch}), or a folder "
                        "every node mounts at the same absolute path (NFS) with storage.shared: true")
    if "://" not in storage and not Path(storage).is_absolute():
        raise SpecError(f"storage.path: {storage} is relative, but the job runs on the cluster; give the shared "
                        "folder's absolute path on the nodes")
    if tracked:
        check_shared_tracking(spec.tracking.uri)


def check_shared_tracking(uri: str | None) -> None:
    """A tracking store every node reaches: an http(s) server or Databricks; refuse the default (a SQLite
    file in the driver's working directory), any other database file and `file:` stores."""
    from orchestrator.tracking.store import resolve_uri

    resolved = resolve_uri(uri)
    if resolved.startswith(SHARED_TRACKING_SCHEMES):
        return
    where = "tracking.uri" if uri else ("$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                        else "tracking.uri (unset: the default)")
    raise SpecError(f"{where} is {resolved}, a store on one node's disk: the cluster's other nodes would log to "
                    f"empty stores of their own. {TRACKING_FIX[0].upper()}{TRACKING_FIX[1:]}")
