"""The training engine: DeepSpeed in the per-worker loop, under Ray Train and in one process.

One-process runs (LocalSession) go through a spawned subprocess: DeepSpeed and the gloo process
group stay out of the pytest process, which also drives Ray.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import TINY_RESTORMER
from faults import crash
from orchestrator.run.jobs import job_config
from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import parse_spec
from workloads.job_config import JobConfig


def spec_data(dataset: Path, storage: Path, name: str = "job", **sections: Any) -> dict[str, Any]:
    """A tiny training job's spec (YAML data): TINY_RESTORMER on `dataset`, 8 iterations; `sections` update it."""
    raw = {
        "name": name,
        "model": TINY_RESTORMER,
        "task": "deraining",
        "data": {"train": str(dataset / "train"), "val": str(dataset / "val"), "patch_size": 32, "batch_size": 4},
        "train": {"iterations": 8, "val_every": 4, "checkpoint_every": 4, "log_every": 1, "lr": 2e-3, "seed": 7},
        "storage": {"path": str(storage)},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def make_spec(dataset: Path, storage: Path, name: str = "job", **sections: Any):
    return parse_spec(spec_data(dataset, storage, name, **sections))


def _run_local(config: JobConfig, directory: str, resume_from: str | None) -> tuple[list[dict], list[str], dict]:
    from workloads.session import LocalSession
    from workloads.train import init_local_process_group, run_training

    init_local_process_group()
    session = LocalSession(Path(directory), Path(resume_from) if resume_from else None)
    result = {}
    try:
        result = run_training(config, session)
    except RuntimeError as error:
        if "injected fault" not in str(error):
            raise
    return session.reports, [str(p) for p in session.checkpoints], result


def run_local(config: JobConfig, directory: Path, resume_from: Path | None = None) -> tuple[list[dict], list[str], dict]:
    """The job run in a spawned process: its reports, its checkpoints, what the recipe returned."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_local, config, str(directory), str(resume_from) if resume_from else None).result()


def losses(reports: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in reports}


def test_resume_continues_exactly_and_consolidated_model_matches(derain_data, tmp_path):
    spec = make_spec(derain_data, tmp_path)
    config = job_config(spec, "job", str(tmp_path))
    full, full_checkpoints, last_validation = run_local(config, tmp_path / "full")

    # Stop right after the checkpoint at iteration 4 (a fault at iteration 5), then resume from it.
    stopped_config = dataclasses.replace(config, test_hook=crash(0, 5, tmp_path / "fault"))
    stopped, stopped_checkpoints, _ = run_local(stopped_config, tmp_path / "stopped")
    assert [r["iteration"] for r in stopped] == [1, 2, 3, 4]
    resumed, _, resumed_validation = run_local(config, tmp_path / "resumed", resume_from=Path(stopped_checkpoints[-1]))

    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    assert all(r["resumed_from"] == 4 for r in resumed)
    for iteration in (5, 6, 7, 8):
        assert losses(resumed)[iteration] == pytest.approx(losses(full)[iteration], abs=1e-6)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in full[4:]], rel=1e-9)
    assert last_validation["iteration"] == 8 and resumed_validation["psnr"] == pytest.approx(last_validation["psnr"])

    # Resumed from its final checkpoint (its process died before the end was reported), the job runs nothing
    # and returns the validation stored with that checkpoint: a sweep's trial reports it, not an empty result.
    again, _, again_validation = run_local(config, tmp_path / "again", resume_from=Path(full_checkpoints[-1]))
    assert again == [] and again_validation == last_validation

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


@pytest.mark.slow  # 20-30 s on 2 cores: `make test` stays under 5 minutes
def test_zero_stages_give_the_same_loss_curve(derain_data, tmp_path):
    curves = {}
    for stage in (0, 1, 2):
        spec = make_spec(derain_data, tmp_path, train={"iterations": 5, "val_every": 100, "checkpoint_every": 100},
                         deepspeed={"zero_stage": stage})
        reports, _, _ = run_local(job_config(spec, "job", str(tmp_path)), tmp_path / f"zero{stage}")
        curves[stage] = [r["loss"] for r in reports]
    assert len(curves[0]) == 5
    # ZeRO sums the clipped gradient norm over its flat partitions in another order; Adam turns those
    # last-bit differences into ~1e-4 relative after a few steps. A wrong partition would be off by %.
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)
    assert curves[2] == pytest.approx(curves[0], rel=1e-3)


# A progressive schedule whose global batch grows: 4 crops of 16 px for 2 steps, then 8 of 24 px.
GROWING_BATCH = {"patch_size": None, "batch_size": None, "patch_sizes": [16, 24], "batch_sizes": [4, 8],
                 "stage_iterations": [2, 2]}


def test_any_number_of_workers_and_micro_batches_see_the_same_global_batch(derain_data, tmp_path):
    """data.batch_size (here the schedule's batch_sizes) is the global batch of a step: split over 1 or 2
    workers and 1 or 2 micro-batches, each step draws the same samples, and DeepSpeed gets the same batch."""
    from workloads.train import deepspeed_config, micro_batch, training_sampler

    steps = {}
    for workers, accumulation in ((1, 1), (1, 2), (2, 1), (2, 2)):
        spec = make_spec(derain_data, tmp_path, data=GROWING_BATCH, resources={"num_workers": workers},
                         train={"grad_accumulation": accumulation})
        config = job_config(spec, "job", str(tmp_path))
        ranks = [list(training_sampler(config, 20, 0, rank, workers)) for rank in range(workers)]
        steps[workers, accumulation] = [sum(shares, []) for shares in zip(*ranks)]  # each step's samples, all ranks
        for iteration, global_batch in enumerate([4, 4, 8, 8]):
            micro = micro_batch(config, workers, iteration)
            assert micro * accumulation * workers == global_batch
            assert all(len(batches[iteration]) == micro * accumulation for batches in ranks)  # the loop's chunks
        ds = deepspeed_config(config.deepspeed, micro_batch=micro_batch(config, workers),
                              accumulation=config.train.grad_accumulation, grad_clip=config.train.grad_clip)
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * workers == 4
    assert [len(step) for step in steps[1, 1]] == [4, 4] + [8] * 6  # 8 iterations
    assert all(samples == steps[1, 1] for samples in steps.values())


def test_job_config_is_typed_pickles_and_logs_the_spec_params(derain_data, tmp_path):
    """What the workers get: the spec's sections as typed fields, orchestration-only parts in their own;
    it survives Ray's pickling, and the run's MLflow params are the spec's sections and the patch schedule."""
    import pickle

    from ray import cloudpickle

    from orchestrator.run.trial_job import run_params
    from workloads.job_config import PbtSegment, TrackedRun

    spec = make_spec(derain_data, tmp_path, train={"grad_accumulation": 2})
    config = job_config(spec, "job", str(tmp_path), tracking=TrackedRun("sqlite:///mlflow.db", "run-id"))
    assert config.train.grad_accumulation == 2 and config.data.schedule == {"patch_size": 32, "batch_size": 4}
    assert config.storage.folder == f"{tmp_path}/job" and config.stop_iteration == 8 and config.test_hook is None
    assert pickle.loads(cloudpickle.dumps(config)) == config
    params = run_params(config)
    assert params["train.grad_accumulation"] == 2 and params["train.betas"] == [0.9, 0.999]
    assert params["data.schedule.patch_size"] == 32 and params["data.train"] == str(derain_data / "train")
    assert params["model.dim"] == TINY_RESTORMER["dim"] and "storage.path" not in params
    assert dataclasses.replace(config, segment=PbtSegment(stop_at=4)).stop_iteration == 4
    with pytest.raises(RuntimeError, match="version 0"):
        dataclasses.replace(config, version=0).check_version()


def test_a_global_batch_that_does_not_split_is_refused(derain_data, tmp_path):
    with pytest.raises(SpecError, match=r"data.batch_size: 6 is a global batch, split over resources.num_workers "
                                        r"\(2\) x train.grad_accumulation \(2\) micro-batches; make it a multiple of "
                                        r"4 \(e.g. 8\) or change num_workers / grad_accumulation"):
        make_spec(derain_data, tmp_path, data={"batch_size": 6}, resources={"num_workers": 2},
                  train={"grad_accumulation": 2})
    with pytest.raises(SpecError, match=r"data.batch_sizes: 6 is a global batch"):
        make_spec(derain_data, tmp_path, data={**GROWING_BATCH, "batch_sizes": [4, 6]}, resources={"num_workers": 4})


def test_a_job_runs_untracked_only_on_a_cluster_that_shares_no_tracking_store(derain_data, tmp_path, monkeypatch):
    """`restorch train` is tracked, except on a cluster whose nodes could not reach its store (a SQLite file on
    one node): there it runs untracked, saying why, as a service without an MLflow server runs train jobs."""
    from orchestrator.run.jobs import unshared_tracking

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = make_spec(derain_data, tmp_path)
    assert unshared_tracking(spec, None) is None
    assert "a store on one node's disk" in unshared_tracking(spec, "http://head:8265")
    served = make_spec(derain_data, tmp_path, tracking={"uri": "http://mlflow.example:5000"})
    assert unshared_tracking(served, "http://head:8265") is None


@pytest.mark.slow
def test_two_workers_zero2_learn_and_survive_a_crash(derain_data, tmp_path):
    """2 Ray Train workers, ZeRO-2: worker 1 crashes once after the first checkpoint; Ray restarts
    the group from that checkpoint; the job finishes and the model beats the rainy input. The job is
    tracked like a sweep trial: one MLflow run with params, each step's metrics once, the model's size,
    the checkpoint location and the consolidated model."""
    from mlflow.tracking import MlflowClient

    from orchestrator.run.jobs import run_job
    from orchestrator.tracking.keys import CHECKPOINT_PATH_TAG, JOB_TAG, MODEL_ARTIFACT, MODEL_TAG

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = make_spec(derain_data, tmp_path, name="crash",
                     train={"iterations": 40, "val_every": 10, "checkpoint_every": 10, "log_every": 5},
                     deepspeed={"zero_stage": 2}, resources={"num_workers": 2}, search={"keep_checkpoints": 10},
                     tracking={"uri": store})
    result, run_id = run_job(spec, test_hook=crash(1, 15, tmp_path / "fault"))

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

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "crash"
    assert run.data.tags[JOB_TAG] == f"{tmp_path}/crash"
    assert run.data.tags[CHECKPOINT_PATH_TAG] == metrics["checkpoint_path"] and run.data.tags[MODEL_TAG] == MODEL_ARTIFACT
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["model.ffn_expansion_factor"] == "2.66"
    assert run.data.metrics["params_m"] > 0 and run.data.metrics["psnr"] == pytest.approx(metrics["psnr"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "psnr")) == [10, 20, 30, 40]
    assert sorted(m.step for m in client.get_metric_history(run_id, "iteration")) == [1, 5, 10, 11, 15, 20, 25, 30, 35, 40]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"spec.yaml", "model"}


def _deepspeed_fp32_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from workloads.train import CHECKPOINT_TAG

    weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=CHECKPOINT_TAG)
    return {name: value.detach() for name, value in weights.items()}


@pytest.mark.slow
def test_two_workers_zero1_bf16_train_writes_the_fp32_model(derain_data, tmp_path):
    """`restorch train` with 2 workers, ZeRO-1, bf16 (the default on GPUs) finishes, and its model.pt
    holds the fp32 master weights of the ranks' optimizer partitions (DeepSpeed's own consolidation)."""
    from workloads.train import load_consolidated

    raw = spec_data(derain_data, tmp_path / "runs", name="bf16", deepspeed={"zero_stage": 1, "precision": "bf16"},
                    resources={"num_workers": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([str(Path(sys.executable).parent / "restorch"), "train", "spec.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    final = tmp_path / "runs" / "bf16" / "checkpoint_0000008"
    weights = load_consolidated(final / "model.pt").state_dict()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        expected = pool.submit(_deepspeed_fp32_weights, str(final)).result()
    assert expected.keys() <= weights.keys()
    assert all(torch.equal(weights[name], value.float()) for name, value in expected.items())
    assert any(not torch.equal(value, value.bfloat16().float()) for value in weights.values())  # fp32, not bf16


def test_a_build_lock_left_by_a_killed_compile_does_not_hang_the_next_job():
    # torch's JIT build waits forever on a `lock` file its killed owner never removed.
    from workloads.deepspeed_ops import SHM_OP, extensions_dir

    lock = extensions_dir() / SHM_OP / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    subprocess.run([sys.executable, "-m", "workloads.deepspeed_ops"], check=True, timeout=600)
    assert not lock.exists()


def test_the_op_is_built_by_the_environments_ninja_whatever_is_on_path(tmp_path):
    # Another ninja first on PATH (a Debian ninja-build 1.11 next to the package's 1.13) hashes the build's
    # commands differently, and would recompile the op on every switch of PATH: this one fails if it is run.
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": f"{other}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "workloads.deepspeed_ops"], env=env, check=True, timeout=600)
    assert not (tmp_path / "ran").exists()
