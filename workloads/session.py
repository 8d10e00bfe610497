"""Where a training loop runs: inside a Ray Train worker, or in this process (tests, benchmarks).

The loop in workloads/train.py only needs its rank, the checkpoint to resume from, and a way to
report metrics (with an optional checkpoint directory): a `Session`; both sessions here provide exactly that.

The checkpoint to resume from is the newest intact one: a checkpoint whose files are damaged (a
torch-saved file that is not a whole zip archive, or whose records fail their CRC check) or cannot be
fetched is named in the log and the one before it is tried, then the one before that.
"""
from __future__ import annotations

import posixpath
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

# A checkpoint: where it is (for the log) and how to fetch it into a local folder.
Candidate = tuple[str, Callable[[str], Any]]
CHECKPOINT_PREFIX = "checkpoint_"  # workloads/train.py names checkpoints checkpoint_{iteration:07d}


class TrialStopped(Exception):
    """A sweep's scheduler stopped the trial during a report (early stopping): not a failure of the run."""


class Session(Protocol):
    """What the loop needs of where it runs (RayTrainSession, LocalSession, orchestrator/run/trial_job.TrackedSession)."""
    rank: int
    world_size: int

    def resume_directory(self) -> tempfile.TemporaryDirectory | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None,
               checkpoint_name: str | None = None) -> None: ...


class RayTrainSession:
    """The Ray Train worker's context (the process group is already set up by Ray)."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def resume_directory(self) -> tempfile.TemporaryDirectory | None:
        """A local copy of the newest intact reported checkpoint, or None for a fresh start."""
        checkpoint = self._train.get_checkpoint()
        return None if checkpoint is None else newest_intact(self._candidates(checkpoint), self.rank)

    def _candidates(self, latest: Any) -> Iterator[Candidate]:
        """The latest checkpoint, then the older ones kept beside it in the run's storage, newest first."""
        yield latest.path, latest.to_directory
        folder, name = posixpath.split(latest.path)
        yield from stored_checkpoints(latest.filesystem, folder, older_than=name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        if checkpoint_dir is None:
            self._train.report(metrics)
            return
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)


def stored_checkpoints(fs: Any, folder: str, older_than: str | None = None) -> list[Candidate]:
    """The checkpoints in `folder` of the pyarrow filesystem `fs` (those named before `older_than`, if given),
    newest first, each with how to fetch it into a local folder."""
    from pyarrow.fs import FileSelector, FileType, copy_files

    found = fs.get_file_info(FileSelector(folder, allow_not_found=True))
    paths = sorted((info.path for info in found if info.type == FileType.Directory
                    and info.base_name.startswith(CHECKPOINT_PREFIX)
                    and (older_than is None or info.base_name < older_than)), reverse=True)
    return [(path, lambda into, path=path: copy_files(path, into, source_filesystem=fs)) for path in paths]


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be loaded (a damaged or missing file), or None."""
    files = sorted(Path(directory).rglob("*.pt"))
    if not files:
        return "it holds no checkpoint files"
    for path in files:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            return f"{path.relative_to(directory)} is damaged ({error})"
        if bad is not None:
            return f"{path.relative_to(directory)} is damaged (its record {bad} fails the CRC check)"
    return None


def newest_intact(candidates: Iterable[Candidate], rank: int) -> tempfile.TemporaryDirectory:
    """A local copy of the first intact checkpoint of `candidates` (newest first); each damaged one is
    named in the log. Raises if none is intact, naming each checkpoint and its problem."""
    problems = []
    for location, fetch in candidates:
        local = tempfile.TemporaryDirectory(prefix="restorch-resume-")
        try:
            fetch(local.name)
            problem = checkpoint_problem(Path(local.name))
        except OSError as error:  # gone from storage, unreadable
            problem = f"it cannot be fetched ({error})"
        if problem is None:
            if problems and rank == 0:
                print(f"[restorch] resuming from {location}", flush=True)
            return local
        local.cleanup()
        problems.append(f"{location}: {problem}")
        if rank == 0:
            print(f"[restorch] checkpoint {location} is unusable: {problem}; trying the one before it", flush=True)
    raise RuntimeError("no intact checkpoint to resume from: " + "; ".join(problems) + ". Delete the run's folder "
                       "to start over")


class LocalSession:
    """A process outside Ray (rank 0 of 1 unless told): reports are kept in `self.reports`, checkpoints
    in `directory`. For several ranks, the caller sets up their process group."""

    def __init__(self, directory: Path, resume_from: Path | None = None, *, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.directory = Path(directory)
        self.resume_from = resume_from
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def resume_directory(self) -> tempfile.TemporaryDirectory | None:
        """A local copy of the newest intact checkpoint from `resume_from` back (the older ones beside it)."""
        if self.resume_from is None:
            return None
        latest = Path(self.resume_from)
        older = sorted((path for path in latest.parent.glob(f"{CHECKPOINT_PREFIX}*") if path.name < latest.name),
                       reverse=True)
        return newest_intact(((str(path), lambda into, path=path: shutil.copytree(path, into, dirs_exist_ok=True))
                              for path in [latest, *older]), self.rank)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            kept = self.directory / (checkpoint_name or f"checkpoint_{len(self.checkpoints):07d}")
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)
