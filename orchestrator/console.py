"""What restorch prints: its own lines, while everything else a sweep's process writes goes to a log.

A sweep's driver process also prints Ray's and Tune's messages, the output of every trial's workers
(Ray forwards it to the driver: 700-character report lines, DeepSpeed's notices) and MLflow's
warnings. Once a sweep has validated its spec it calls `console.capture(log)`: from then on the
process's file descriptors 1 and 2 write to `log`, so all of that goes there, whichever library
writes it and however (Python, C, a forwarding thread); restorch's own lines, `console.print`, go to
the terminal. This happens only inside `console.command(quiet=True)`, in which the CLI runs each
command (`--verbose`: quiet=False); called from Python, a sweep leaves its process's output alone.
When the command ends, `release` first stops Ray, whose forwarding thread would otherwise print
workers' late lines after the final table, then gives the terminal back.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


class Console:
    def __init__(self) -> None:
        self.quiet = False  # set by `command`: `capture` takes effect
        self.log: Path | None = None  # where the other output goes, while captured
        self._terminal: TextIO | None = None
        self._saved_fds: list[int] = []
        self._ray_was_up = False  # Ray was connected before the capture: not this command's to stop

    def print(self, text: str = "") -> None:
        print(text, file=self._terminal or sys.stdout, flush=True)

    @contextmanager
    def command(self, *, quiet: bool) -> Iterator[None]:
        """Run a CLI command; `quiet`: a sweep in it sends what is not restorch's to its log."""
        self.quiet = quiet
        try:
            yield
        finally:
            self.release()
            self.quiet = False

    def capture(self, log: Path, source: str = "Ray, MLflow and worker output") -> None:
        """In a quiet command, send file descriptors 1 and 2 to `log` (appended); restorch's lines keep
        the terminal. Says once where `source` goes."""
        if not self.quiet or self._terminal is not None:
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._ray_was_up = _ray_connected()
        self._saved_fds = [os.dup(1), os.dup(2)]
        self._terminal = os.fdopen(os.dup(1), "w")
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.log = log
        self.print(f"{source}: {log} (--verbose prints it here)")

    def release(self) -> None:
        """Stop the Ray this command connected to (its log-forwarding thread), then give file descriptors
        1 and 2 back. A Ray connected before the capture (a caller's, e.g. a test's) stays up."""
        if self._terminal is None:
            return
        if _ray_connected() and not self._ray_was_up:
            import ray

            ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        self._terminal.close()
        self._terminal, self._saved_fds, self.log = None, [], None


def _ray_connected() -> bool:
    if "ray" not in sys.modules:  # never imported: not connected, and no need to import it to say so
        return False
    import ray

    return ray.is_initialized()


console = Console()


@contextmanager
def quiet_mlflow(command: str) -> Iterator[None]:
    """Around the MLflow calls of the commands that load or register models (register, restore,
    evaluate), in a quiet command: what MLflow prints (its messages, UserWarnings) goes to
    {temp}/restorch/COMMAND.log, and it draws no artifact download bars."""
    if not console.quiet:
        yield
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console.capture(Path(tempfile.gettempdir()) / "restorch" / f"{command}.log", source="MLflow's output")
    try:
        yield
    finally:
        console.release()
