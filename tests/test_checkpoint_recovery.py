"""A damaged latest checkpoint: the job resumes from the newest intact one before it, naming the bad
file in the log, or fails naming every checkpoint it tried (workloads/session.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_RESTORMER
from faults import crash
from orchestrator.spec.load import parse_spec
from workloads.session import LocalSession


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    """A bit flip inside a tensor's data: torch.load would read it back silently."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def checkpoints(root: Path, iterations: list[int]) -> list[Path]:
    folders = []
    for iteration in iterations:
        folder = root / f"checkpoint_{iteration:07d}"
        (folder / "state").mkdir(parents=True)
        torch.save({"module": torch.randn(2000), "iteration": iteration}, folder / "state" / "mp_rank_00_model_states.pt")
        folders.append(folder)
    return folders


def test_the_newest_intact_checkpoint_is_resumed_and_the_damaged_ones_named(tmp_path, capsys):
    two, four, six = checkpoints(tmp_path / "run", [2, 4, 6])
    truncate(six / "state" / "mp_rank_00_model_states.pt")
    flip_a_byte(four / "state" / "mp_rank_00_model_states.pt")

    with LocalSession(tmp_path / "new", resume_from=six).resume_directory() as directory:
        assert torch.load(Path(directory) / "state" / "mp_rank_00_model_states.pt")["iteration"] == 2
    log = capsys.readouterr().out
    assert f"checkpoint {six} is unusable: state/mp_rank_00_model_states.pt is damaged (File is not a zip file)" in log
    assert f"checkpoint {four} is unusable: state/mp_rank_00_model_states.pt is damaged (its record" in log
    assert f"resuming from {two}" in log

    truncate(two / "state" / "mp_rank_00_model_states.pt")
    with pytest.raises(RuntimeError, match=rf"no intact checkpoint to resume from: {six}: .*; {four}: .*; {two}: "
                                           r"state/mp_rank_00_model_states.pt is damaged"):
        LocalSession(tmp_path / "new", resume_from=six).resume_directory()


@pytest.mark.slow
def test_a_job_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before(derain_data, tmp_path):
    """A real Ray Train job stops at iteration 5 (checkpoints 2 and 4 committed); checkpoint 4's model
    file is then damaged. Running the job again resumes from checkpoint 2 and finishes; the worker's log
    names the damaged file."""
    import ray
    from ray.train import TrainingFailedError

    from orchestrator.run.jobs import run_job

    spec = parse_spec({
        "name": "damaged", "model": TINY_RESTORMER, "task": "deraining",
        "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": 6, "val_every": 2, "checkpoint_every": 2, "log_every": 2, "max_failures": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    ray.shutdown()
    try:
        with pytest.raises(TrainingFailedError):
            run_job(spec, test_hook=crash(0, 5, tmp_path / "fault"))
        damaged = tmp_path / "runs" / "damaged" / "checkpoint_0000004" / "state" / "mp_rank_00_model_states.pt"
        truncate(damaged)

        result, _ = run_job(spec)
        assert result.error is None
        assert result.metrics["resumed_from"] == 2 and result.metrics["iteration"] == 6
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        expected = (f"checkpoint {damaged.parents[1]} is unusable: state/mp_rank_00_model_states.pt is damaged")
        assert any(expected in path.read_text(errors="replace") for path in logs.glob("worker-*.out"))
    finally:
        ray.shutdown()
