"""Where runs are stored: a local folder, or `s3://bucket/prefix` (spec `storage.path`, with
`storage.endpoint_url` for an S3-compatible store such as MinIO).

Ray Train and Tune get the location as a pyarrow filesystem plus a path inside it (`filesystem`):
with a filesystem object Ray wants the path without its `s3://`. Workers read datasets through it too
(workloads/staging.py), so it lives with them. S3 credentials come from the
standard AWS chain (environment, ~/.aws, the instance profile on EC2), resolved by each process
that reads or writes, so nothing secret travels with a job.

What an interrupted upload leaves (checked in tests/test_storage.py):
- pyarrow writes every S3 object as a multipart upload (parts of 10 MB for large checkpoint files)
  that becomes visible only when it completes: an interrupted upload leaves no object at all, never
  a truncated one. (Its uploaded parts stay until aborted: give the bucket a lifecycle rule
  `AbortIncompleteMultipartUpload`.)
- Ray Train commits a checkpoint by listing it in the run's `checkpoint_manager_snapshot.json`
  after every file is uploaded; a resumed run restores from that list only. A `checkpoint_*`
  folder that an interrupted upload left half-written is ignored (and rewritten when the run gets
  there again). A checkpoint is complete when the snapshot, and the metrics reported with it
  (`checkpoint_path`), name it.

MLflow's artifacts go to S3 through a shared tracking server (`restorch tracking up --artifacts
s3://...`, orchestrator/tracking/server.py), which alone needs S3 access.
"""
from __future__ import annotations

import errno
from pathlib import Path
from urllib.parse import urlencode, urlparse

import pyarrow.fs

# A full or failing storage: reported as such (the command's error, no traceback), not as a crash.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)



def filesystem(location: str, endpoint_url: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem holding `location` (a local folder or a URI such as s3://bucket/prefix) and
    the path of `location` inside it; `endpoint_url` (http[s]://host:port) points S3 elsewhere than AWS."""
    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())
    if endpoint_url and location.startswith("s3://"):
        endpoint = urlparse(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise ValueError(f"storage.endpoint_url: {endpoint_url!r} is not an http(s)://host[:port] address")
        location += "?" + urlencode({"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme})
    return pyarrow.fs.FileSystem.from_uri(location)


def write_text(folder: str, name: str, text: str, endpoint_url: str | None = None) -> None:
    """`text` as the file `name` in `folder` (local or S3), the folder made if needed."""
    fs, path = filesystem(folder, endpoint_url)
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/{name}") as stream:
        stream.write(text.encode())


def read_text(folder: str, name: str, endpoint_url: str | None = None) -> str | None:
    """The text of the file `name` in `folder` (local or S3), or None if there is no such file."""
    fs, path = filesystem(folder, endpoint_url)
    if fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{name}") as stream:
        return stream.read().decode()
