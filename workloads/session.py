"""Where a training loop runs: inside a Ray Train worker, or in this process (tests, benchmarks).

The loop in workloads/train.py only needs its rank, the checkpoint to resume from, and a way to
report metrics (with an optional checkpoint directory); both sessions provide exactly that.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


class RayTrainSession:
    """The Ray Train worker's context (the process group is already set up by Ray)."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def resume_directory(self) -> tempfile.TemporaryDirectory | None:
        """A local copy of the last reported checkpoint, or None for a fresh start."""
        checkpoint = self._train.get_checkpoint()
        return None if checkpoint is None else local_copy(checkpoint)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        if checkpoint_dir is None:
            self._train.report(metrics)
            return
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir))
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)


def local_copy(checkpoint: Any) -> tempfile.TemporaryDirectory:
    """A local copy of a Ray checkpoint (wherever it is stored), removed with the returned directory."""
    local = tempfile.TemporaryDirectory(prefix="restorch-resume-")
    checkpoint.to_directory(local.name)
    return local


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
        if self.resume_from is None:
            return None
        local = tempfile.TemporaryDirectory(prefix="restorch-resume-")
        shutil.copytree(self.resume_from, local.name, dirs_exist_ok=True)
        return local

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            kept = self.directory / (checkpoint_name or f"checkpoint_{len(self.checkpoints):07d}")
            shutil.copytree(checkpoint_dir, kept)
            self.checkpoints.append(kept)
