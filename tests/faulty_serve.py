"""`restorch serve` with a fault right after the Ray job of a named experiment is submitted, before the
service records it (for tests/test_dispatcher.py):

    python tests/faulty_serve.py '{"NAME": "locked" | "kill", ...}' serve ...

"locked": the service's next commit in that thread (the dispatcher's record of the job) fails with
`database is locked`, as SQLite's does when another writer holds the database; "kill": the service
SIGKILLs itself. Each fault happens once. The rest is the real `restorch serve`.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from orchestrator.service import dispatcher
from orchestrator.cli import main


def fail_next_commit_in_this_thread() -> None:
    thread, armed = threading.get_ident(), [True]

    def locked(session: Session) -> None:
        if armed[0] and threading.get_ident() == thread:
            armed[0] = False
            raise OperationalError("COMMIT", None, sqlite3.OperationalError("database is locked"))

    event.listen(Session, "before_commit", locked)


def inject(faults: dict[str, str]) -> None:
    submit = dispatcher.RayCluster.submit

    def faulty_submit(cluster: dispatcher.RayCluster, experiment: Any, *args: Any) -> Any:
        submitted = submit(cluster, experiment, *args)
        fault = faults.pop(experiment.name, None)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "locked":
            fail_next_commit_in_this_thread()
        return submitted

    dispatcher.RayCluster.submit = faulty_submit


if __name__ == "__main__":
    inject(json.loads(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
