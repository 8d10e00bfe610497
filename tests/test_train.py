"""The training engine: DeepSpeed in the per-worker loop, under Ray Train and in one process.

One-process runs (LocalSession) go through a spawned subprocess: DeepSpeed and the gloo process
group stay out of the pytest process, which also drives Ray.
"""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_RESTORMER
from orchestrator.jobs import job_config
from orchestrator.spec import parse_spec


def make_spec(data: Path, storage: Path, name: str = "job", **sections: Any):
    raw = {
        "name": name,
        "model": TINY_RESTORMER,
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 4},
        "train": {"iterations": 8, "val_every": 4, "checkpoint_every": 4, "log_every": 1, "lr": 2e-3, "seed": 7},
        "storage": {"path": str(storage)},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_spec(raw)


def _run_local(config: dict, directory: str, resume_from: str | None) -> tuple[list[dict], list[str]]:
    from workloads.session import LocalSession
    from workloads.train import init_local_process_group, run_training

    init_local_process_group()
    session = LocalSession(Path(directory), Path(resume_from) if resume_from else None)
    try:
        run_training(config, session)
    except RuntimeError as error:
        if "injected fault" not in str(error):
            raise
    return session.reports, [str(p) for p in session.checkpoints]


def run_local(config: dict, directory: Path, resume_from: Path | None = None) -> tuple[list[dict], list[str]]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_local, config, str(directory), str(resume_from) if resume_from else None).result()


def losses(reports: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in reports}


def test_resume_continues_exactly_and_consolidated_model_matches(derain_data, tmp_path):
    spec = make_spec(derain_data, tmp_path)
    config = job_config(spec, "job", str(tmp_path))
    full, full_checkpoints = run_local(config, tmp_path / "full")

    # Stop right after the checkpoint at iteration 4 (a fault at iteration 5), then resume from it.
    stopped_config = {**config, "fault": {"rank": 0, "at_iteration": 5, "marker": str(tmp_path / "fault")}}
    stopped, stopped_checkpoints = run_local(stopped_config, tmp_path / "stopped")
    assert [r["iteration"] for r in stopped] == [1, 2, 3, 4]
    resumed, _ = run_local(config, tmp_path / "resumed", resume_from=Path(stopped_checkpoints[-1]))

    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    assert all(r["resumed_from"] == 4 for r in resumed)
    for iteration in (5, 6, 7, 8):
        assert losses(resumed)[iteration] == pytest.approx(losses(full)[iteration], abs=1e-6)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in full[4:]], rel=1e-9)

    # model.pt: the consolidated fp32 weights, loadable without DeepSpeed, equal to DeepSpeed's module.
    from workloads.train import load_consolidated

    final = Path(full_checkpoints[-1])
    restored = load_consolidated(final / "model.pt")
    from models import build_model

    deepspeed_module = build_model(TINY_RESTORMER).eval()
    deepspeed_module.load_state_dict(torch.load(final / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    image = torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        assert torch.equal(restored(image), deepspeed_module(image))


def test_zero_stages_give_the_same_loss_curve(derain_data, tmp_path):
    curves = {}
    for stage in (0, 1, 2):
        spec = make_spec(derain_data, tmp_path, train={"iterations": 5, "val_every": 100, "checkpoint_every": 100},
                         deepspeed={"zero_stage": stage})
        reports, _ = run_local(job_config(spec, "job", str(tmp_path)), tmp_path / f"zero{stage}")
        curves[stage] = [r["loss"] for r in reports]
    assert len(curves[0]) == 5
    # ZeRO sums the clipped gradient norm over its flat partitions in another order; Adam turns those
    # last-bit differences into ~1e-4 relative after a few steps. A wrong partition would be off by %.
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)
    assert curves[2] == pytest.approx(curves[0], rel=1e-3)


@pytest.mark.slow
def test_two_workers_zero2_learn_and_survive_a_crash(derain_data, tmp_path):
    """2 Ray Train workers, ZeRO-2: worker 1 crashes once after the first checkpoint; Ray restarts
    the group from that checkpoint; the job finishes and the model beats the rainy input."""
    from orchestrator.jobs import run_job

    spec = make_spec(derain_data, tmp_path, name="crash",
                     train={"iterations": 40, "val_every": 10, "checkpoint_every": 10, "log_every": 5},
                     deepspeed={"zero_stage": 2}, resources={"num_workers": 2}, search={"keep_checkpoints": 10})
    result = run_job(spec, fault={"rank": 1, "at_iteration": 15, "marker": str(tmp_path / "fault")})

    assert result.error is None
    assert (tmp_path / "fault").exists()  # the crash happened
    metrics = result.metrics
    assert metrics["iteration"] == 40
    assert metrics["resumed_from"] == 10  # restarted from the last checkpoint before the crash
    assert metrics["psnr"] > metrics["input_psnr"]
    history = result.metrics_dataframe.sort_values("iteration")  # metrics of the kept checkpoints: 10, 20, 30, 40
    assert list(history["iteration"]) == [10, 20, 30, 40]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert history["psnr"].iloc[-1] > history["psnr"].iloc[0]
    assert (Path(result.checkpoint.path) / "model.pt").exists()


def test_a_build_lock_left_by_a_killed_compile_does_not_hang_the_next_job():
    # torch's JIT build waits forever on a `lock` file its killed owner never removed.
    from workloads.deepspeed_ops import SHM_OP, extensions_dir

    lock = extensions_dir() / SHM_OP / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    subprocess.run([sys.executable, "-m", "workloads.deepspeed_ops"], check=True, timeout=600)
    assert not lock.exists()
