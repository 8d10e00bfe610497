"""The node's dataset cache: folders built once per node and kept across jobs, trials and restarts.

Every entry is a folder named after a digest of what it holds (`listing_digest`), so changed data gets
a new entry and never a stale one. `build_once` makes an entry under a file lock: the first process of
the node to get there builds it into a temporary folder and renames it into place (atomic), the
others wait on the lock and then use it; a process killed while building leaves only a temporary
folder, cleared by the next builder.

The cache lives in `data.cache_dir` of the spec, else $RESTORCH_CACHE_DIR, else ~/.cache/restorch:
a local disk of each node (not a shared one: its locks and memory-mapped reads are per node).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "RESTORCH_CACHE_DIR"


def cache_root(configured: str | Path | None = None) -> Path:
    """The cache folder: `configured`, else $RESTORCH_CACHE_DIR, else ~/.cache/restorch."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "restorch").expanduser()


def listing_digest(entries: Iterable[tuple[str, int, int]], *, version: str) -> str:
    """A digest of a file listing: (relative path, size, modification time in ns) of each file, and
    the `version` of what is built from the files (a new version builds anew)."""
    digest = hashlib.sha256(version.encode())
    for path, size, mtime_ns in sorted(entries):
        digest.update(f"\n{path}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()[:24]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (made if needed) across the processes of this node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(folder: Path, build: Callable[[Path], None]) -> bool:
    """Make `folder` with `build(temporary_folder)` unless it exists; True when this process built it."""
    if folder.is_dir():
        return False
    with locked(folder.parent / f"{folder.name}.lock"):
        if folder.is_dir():  # built by another process while this one waited
            return False
        for stale in folder.parent.glob(f".{folder.name}.building-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        building = folder.parent / f".{folder.name}.building-{os.getpid()}"
        building.mkdir()
        try:
            build(building)
            building.rename(folder)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return True
