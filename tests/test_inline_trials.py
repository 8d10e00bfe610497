"""Inline trials (orchestrator/run/inline_trial.py): which sweeps get them, and how their checkpoints are kept
and resumed from. The sweeps themselves run in tests/test_sweep.py and tests/test_run_history.py, in both modes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from orchestrator.run.inline_trial import REPORT_FILE, InlineSession
from orchestrator.run.jobs import job_config
from orchestrator.spec.load import parse_spec
from orchestrator.spec.schema import SpecError


def _spec(data: Path, **resources: object) -> object:
    return parse_spec(tiny_spec("inline", data, {"train.lr": {"grid": [1e-3, 2e-3]}}, resources=resources))


def test_auto_trains_one_worker_trials_inline_and_inline_refuses_several_workers(tmp_path):
    assert _spec(tmp_path).inline_trials()
    assert not _spec(tmp_path, trial_mode="job").inline_trials()
    assert not _spec(tmp_path, num_workers=2).inline_trials()
    with pytest.raises(SpecError, match="trial_mode: an inline trial trains in one process, but num_workers is 2"):
        _spec(tmp_path, trial_mode="inline", num_workers=2)


def _stored(folder: Path, iteration: int, psnr: float | None, *, complete: bool = True) -> None:
    """A checkpoint as an inline trial stores it: its files, then (last) its report."""
    checkpoint = folder / f"checkpoint_{iteration:07d}"
    checkpoint.mkdir(parents=True)
    torch.save({"iteration": iteration}, checkpoint / "state.pt")
    if complete:
        report = {"iteration": iteration} if psnr is None else {"iteration": iteration, "psnr": psnr}
        (checkpoint / REPORT_FILE).write_text(json.dumps(report))


def _session(tmp_path: Path, keep: int | None) -> InlineSession:
    config = job_config(_spec(tmp_path), "trial-1", str(tmp_path / "jobs"))
    return InlineSession(config, keep=keep, metric="psnr", mode="max", for_tune=None)


def test_resume_skips_a_checkpoint_whose_storing_was_cut_short(tmp_path, capsys):
    jobs = tmp_path / "jobs" / "trial-1"
    _stored(jobs, 3, 24.0)
    _stored(jobs, 6, None, complete=False)  # the trial's process died while storing it
    with _session(tmp_path, keep=2).resume_directory() as folder:
        assert torch.load(Path(folder) / "state.pt")["iteration"] == 3
    assert "checkpoint_0000006 is incomplete" in capsys.readouterr().out
    assert _session(tmp_path / "none", keep=2).resume_directory() is None  # nothing stored: a fresh start


def test_checkpoints_a_ray_train_job_of_the_trial_stored_are_resumed_from(tmp_path):
    """A sweep whose trials ran as jobs, resumed inline: Ray Train's record says which checkpoints are whole."""
    jobs = tmp_path / "jobs" / "trial-1"
    _stored(jobs, 3, None, complete=False)
    _stored(jobs, 6, None, complete=False)  # stored, but not yet in Ray's record when the job died
    (jobs / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_0000003", "metrics": {"psnr": 24.0}}]}))
    with _session(tmp_path, keep=2).resume_directory() as folder:
        assert torch.load(Path(folder) / "state.pt")["iteration"] == 3


def test_the_latest_and_the_best_checkpoints_are_kept(tmp_path):
    jobs = tmp_path / "jobs" / "trial-1"
    for iteration, psnr in ((3, 25.0), (6, 27.0), (9, None)):
        _stored(jobs, iteration, psnr)
    session = _session(tmp_path, keep=2)
    new = tmp_path / "new"
    new.mkdir()
    torch.save({"iteration": 12}, new / "state.pt")
    session.report({"iteration": 12, "psnr": 26.0}, checkpoint_dir=new, checkpoint_name="checkpoint_0000012")
    # kept: the latest (12) and the best of the others by psnr (6); an unscored one ranks last
    assert sorted(path.name for path in jobs.iterdir()) == ["checkpoint_0000006", "checkpoint_0000012"]
    assert json.loads((jobs / "checkpoint_0000012" / REPORT_FILE).read_text())["psnr"] == 26.0
    assert session.last_checkpoint.endswith("checkpoint_0000012")
    all_kept = _session(tmp_path, keep=None)  # pbt trials keep every checkpoint
    all_kept.report({"iteration": 15}, checkpoint_dir=new, checkpoint_name="checkpoint_0000015")
    assert len(list(jobs.iterdir())) == 3
