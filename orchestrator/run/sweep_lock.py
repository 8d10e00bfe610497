"""One driver per sweep: a lock in the sweep's folder in storage, taken before the driver writes anything.

Two `restorch sweep` of one name started together both ran Tune in one folder, and the second overwrote the
first's results (issue 24). Now the second refuses at once, naming the driver that holds the sweep.

Local folder (also an NFS folder that nodes share): `{sweep}/sweep.lock`, held with flock(2) for the
driver's life. The kernel drops the lock when the driver dies, however it dies, so a dead driver's lock is
free at once (no pid check needed); the file holds the owner (host, pid, start time) for the refusal. The
file stays when the sweep ends: unlinking it could let two later drivers lock two different files.

S3 (no file locks): an object `{sweep}/sweep.lock` holding the owner and when its lease expires, created
only if absent (a conditional PUT, If-None-Match: *). A thread of the driver renews the lease every
LEASE_S / 3 with a PUT conditional on the object's ETag, so a driver whose lock was taken over learns it.
A lock object is stale once its lease has expired, or at once when its owner ran on this host and its pid
is gone; a stale lock is taken over with a PUT conditional on the ETag just read, so of two drivers taking
it over only one wins. The object is deleted when the sweep ends.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.console import console
from orchestrator.spec.schema import SpecError

LOCK_FILE = "sweep.lock"
LEASE_S = 60.0
_LOST = ("PreconditionFailed", "ConditionalRequestConflict")  # S3's answers to a failed conditional PUT


class SweepLocked(SpecError):
    """Another driver runs the sweep."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _refusal(folder: str, owner: dict[str, Any]) -> SweepLocked:
    holder = (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}" if owner
              else "a driver that is starting")
    return SweepLocked(f"the sweep in {folder} is being run by another driver ({holder}); wait for it to end, or stop "
                       "it (a driver that died leaves the lock free: restorch sweep takes it over)")


@contextmanager
def sweep_lock(folder: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Hold the lock of the sweep stored at `folder` (a local folder or s3://bucket/prefix/name) while
    the block runs; raise SweepLocked, naming the holder, if a live driver holds it."""
    if folder.startswith("s3://"):
        with _s3_lock(folder, endpoint_url):
            yield
    elif "://" in folder:
        raise SpecError(f"storage.path: {folder} is neither a local folder nor s3://; restorch locks a sweep's "
                        "folder (one driver per sweep) only there")
    else:
        with _local_lock(Path(folder)):
            yield


@contextmanager
def _local_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(descriptor, 4096).decode()
            raise _refusal(str(folder), json.loads(text) if text else {}) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(_owner()).encode())
        yield
    finally:
        os.close(descriptor)  # drops the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: dict[str, Any]) -> bool:
    return owner["expires"] < time.time() or (owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"]))


@contextmanager
def _s3_lock(folder: str, endpoint_url: str | None) -> Iterator[None]:
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, prefix = folder.removeprefix("s3://").partition("/")
    where = {"Bucket": bucket, "Key": f"{prefix}/{LOCK_FILE}"}
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    owner = _owner()

    def put(**condition: str) -> str:
        body = json.dumps({**owner, "expires": time.time() + LEASE_S})
        return s3.put_object(**where, Body=body.encode(), ContentType="application/json", **condition)["ETag"]

    def code(err: ClientError) -> str:
        return err.response.get("Error", {}).get("Code", "")

    try:
        etag = put(IfNoneMatch="*")
    except ClientError as err:
        if code(err) not in _LOST:
            raise
        held = s3.get_object(**where)
        holder = json.loads(held["Body"].read())
        if not _stale(holder):
            raise _refusal(folder, holder) from None
        try:
            etag = put(IfMatch=held["ETag"])
        except ClientError as lost:
            if code(lost) not in _LOST:
                raise
            raise _refusal(folder, json.loads(s3.get_object(**where)["Body"].read())) from None

    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(LEASE_S / 3):
            try:
                etag = put(IfMatch=etag)
            except Exception as err:  # noqa: BLE001 - the sweep goes on; the user is told
                console.print(f"sweep lock {folder}/{LOCK_FILE}: lease not renewed ({err}); another driver may "
                              "take the sweep over")
                return

    renewer = threading.Thread(target=renew, name="sweep-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with suppress(ClientError):  # gone, or taken over: not ours to delete
            if s3.head_object(**where)["ETag"] == etag:
                s3.delete_object(**where)
