"""Remote datasets (`data.train` / `data.val` as s3://bucket/prefix, or another URI that pyarrow or
fsspec reads) staged once per node into the node's cache (workloads/node_cache.py).

A dataset's digest covers the listing of its prefix (each object's relative path, size and
modification time): an object written again, added or removed changes it. The folder
`<cache>/staged/<digest>/` holds a copy of the prefix; the first process of a node downloads it under
the cache's lock, the others wait and use it. A run pins its datasets' digests when it starts (the
spec's `data.digests`, see orchestrator/spec/schema.py): a worker that finds a dataset changed since then
stops with `DatasetChanged` rather than train a trial on other data than its siblings, and a node
that already holds the pinned copy uses it without asking the store.

S3 is reached as the run's storage is (workloads/storage.py): `storage.endpoint_url` for an
S3-compatible store, credentials from the standard AWS chain (AWS_* variables, ~/.aws, the instance's role).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.fs

from workloads.node_cache import build_once, listing_digest

STAGE_VERSION = "staged-1"
DOWNLOAD_THREADS = 16
CHUNK_BYTES = 8 << 20


class DatasetUnavailable(ValueError):
    """A remote dataset that cannot be listed (unreachable store, missing bucket or prefix, no files)."""


class DatasetChanged(RuntimeError):
    """A remote dataset whose content differs from the digest pinned when the run started."""


def is_uri(location: str) -> bool:
    return "://" in location


def _filesystem(uri: str, endpoint_url: str | None) -> tuple[pyarrow.fs.FileSystem, str]:
    from workloads.storage import filesystem

    try:
        return filesystem(uri, endpoint_url)
    except pyarrow.ArrowInvalid:  # a scheme pyarrow has no filesystem for: fsspec may have one
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as error:
            raise DatasetUnavailable(f"{uri}: no filesystem reads this URI ({error}); use s3://bucket/prefix, "
                                     "another scheme pyarrow reads, or install the fsspec package for it") from None
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


@dataclass(frozen=True)
class RemoteDataset:
    """The listing of a remote dataset: (path relative to the prefix, size, mtime in ns) per file."""

    uri: str
    filesystem: pyarrow.fs.FileSystem
    root: str
    files: tuple[tuple[str, int, int], ...]

    @property
    def digest(self) -> str:
        return listing_digest(self.files, version=STAGE_VERSION)

    def download(self, folder: Path) -> None:
        """Copy every listed file under `folder`, with its size checked and its mtime kept."""
        def fetch(entry: tuple[str, int, int]) -> None:
            name, size, mtime_ns = entry
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.filesystem.open_input_stream(f"{self.root}/{name}") as stream, open(target, "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    out.write(chunk)
            if target.stat().st_size != size:
                raise DatasetChanged(f"{self.uri}/{name} changed while it was staged ({size} bytes listed, "
                                     f"{target.stat().st_size} read): do not write to a dataset while runs use it")
            os.utime(target, ns=(mtime_ns, mtime_ns))  # the decode cache then keys the copy alike on every node

        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, self.files))


def list_remote(uri: str, endpoint_url: str | None = None) -> RemoteDataset:
    """The files under `uri`; `DatasetUnavailable` naming the cause and the fix if it cannot be listed."""
    fs, root = _filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except (OSError, pyarrow.ArrowException) as error:
        raise DatasetUnavailable(f"cannot list {uri} ({error}): check the bucket and prefix, the S3 endpoint "
                                 "(storage.endpoint_url) and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                 "or AWS_PROFILE)") from None
    files = tuple(sorted((info.path[len(root) + 1:], info.size, info.mtime_ns or 0)
                         for info in infos if info.type == pyarrow.fs.FileType.File))
    if not files:
        raise DatasetUnavailable(f"{uri} holds no files: check the prefix, or upload the dataset there")
    return RemoteDataset(uri, fs, root, files)


def stage(uri: str, *, cache: Path, endpoint_url: str | None = None, pinned: str | None = None) -> Path:
    """The local copy of the dataset at `uri` in the node's cache, downloaded unless already there.
    `pinned`: the digest the run started with; `DatasetChanged` if the dataset now has another."""
    staged = cache / "staged"
    if pinned and (staged / pinned).is_dir():
        return staged / pinned
    remote = list_remote(uri, endpoint_url)
    if pinned and remote.digest != pinned:
        raise DatasetChanged(
            f"{uri} changed since this run started: its digest was pinned as {pinned} and is now {remote.digest} "
            "(an object was written, added or removed). Trials of one run must train on the same data: restore the "
            "dataset, or start a new run (a new sweep) to use the new data")
    build_once(staged / remote.digest, remote.download)
    return staged / remote.digest
