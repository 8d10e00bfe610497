"""`restorch bench`: ratios to the baseline measured in one run, logged as an MLflow benchmark run.
Tiny models and one round: these check what is computed and logged, not speed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RESTORMER
from orchestrator.run.benchmarks import BENCHMARK_EXPERIMENT, bench_models, log_benchmark
from orchestrator.tracking.keys import RECORD_ARTIFACTS
from orchestrator.run.timeline import PHASES, TIMELINE_ENV, first_reached, mark
from workloads.synth import write_dataset
from workloads.tasks import get_task


def test_model_ratios_are_to_csa_restormer_and_logged(tmp_path):
    variants = {"restormer": TINY_RESTORMER, "restormer+glmha": {**TINY_RESTORMER, "attention": "glmha"}}
    base, glmha = bench_models(size=32, repeats=1, warmup=0, variants=variants)
    assert base["fwd_ratio"] == base["fwd_bwd_ratio"] == base["activation_ratio"] == 1.0
    assert glmha["fwd_bwd_ratio"] == pytest.approx(glmha["fwd_bwd_s"] / base["fwd_bwd_s"])
    assert glmha["conv_gmacs"] < base["conv_gmacs"] and glmha["params_m"] < base["params_m"]
    assert base["activation_mb"] > 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(log_benchmark("models", [base, glmha], {"size": 32}, uri))
    assert run.data.tags["restorch.kind"] == "benchmark" and run.data.params["size"] == "32"
    assert run.data.metrics["restormer_glmha.fwd_bwd_ratio"] == pytest.approx(glmha["fwd_bwd_ratio"])
    assert {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)} == {"models.txt", "models.csv", RECORD_ARTIFACTS}
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == BENCHMARK_EXPERIMENT
    # beside the store, like every other run's (not a stray ./mlruns in the working directory)
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_deepspeed_overhead_is_the_step_time_ratio():
    # DeepSpeed and its process group stay out of the pytest process
    script = ("import json\nfrom orchestrator.run.benchmarks import bench_train\n"
              f"print(json.dumps(bench_train(patch=32, repeats=1, warmup=0, variants={{'tiny': {TINY_RESTORMER!r}}})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["model"] == "tiny" and row["plain_img_s"] > 0 and row["deepspeed_img_s"] > 0
    # one round: the median of the per-round ratios is that round's ratio
    assert row["deepspeed_overhead"] == pytest.approx(row["plain_img_s"] / row["deepspeed_img_s"])


def test_the_benchmarks_module_leaves_the_slow_imports_to_the_benchmarks_using_them():
    """`restorch bench models` pays for torch and the models only: MLflow, Ray, DeepSpeed, skimage (the
    synthetic data) and the training recipe are imported by the benchmark steps that use them."""
    slow = ["mlflow", "ray", "deepspeed", "skimage", "workloads.train", "workloads.synth"]
    script = f"import sys\nimport orchestrator.run.benchmarks\nprint([m for m in {slow!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_sweep_overhead_runs_the_same_trials_both_ways(tmp_path):
    """Both trial modes against the same direct trainings; every process of each sweep marks its phases."""
    script = ("import json\nfrom orchestrator.run.benchmarks import bench_sweep\n"
              f"print(json.dumps(bench_sweep(trials=2, concurrent=2, iterations=4, folder={str(tmp_path)!r})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["model"] for row in rows] == ["sweep-job", "sweep-inline"]
    for row in rows:
        assert row["direct_s"] > 0 and row["sweep_overhead"] == pytest.approx(row["sweep_s"] / row["direct_s"])
        assert 0 < row["first_iteration_s"] < row["sweep_s"]
        # in the order a trial goes through them (an inline trial's "worker" is its own process)
        reached = [row[f"{phase}_s"] for phase in PHASES] + [row["first_iteration_s"]]
        assert 0 < reached[0] and reached == sorted(reached)
        # which trials ASHA stops depends on their seeds' scores: the ratio is there when it stopped any
        assert (row["asha_stopped_wall_ratio"] > 0) if row["asha_stopped"] else row["asha_stopped_wall_ratio"] is None


def test_timeline_keeps_when_each_phase_was_first_reached(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMELINE_ENV, str(tmp_path / "timeline.txt"))
    before = time.time()
    mark("driver_validated")
    mark("worker_started")
    mark("worker_started")
    reached = first_reached(tmp_path / "timeline.txt")
    assert set(reached) == {"driver_validated", "worker_started"}
    assert before - 0.001 <= reached["driver_validated"] <= reached["worker_started"] <= time.time() + 0.001  # kept to the ms


def test_timeline_marks_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(TIMELINE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    mark("driver_validated")
    assert list(tmp_path.iterdir()) == []


def test_data_benchmark_compares_the_loader_before_the_cache_cold_and_warm(tmp_path):
    write_dataset(tmp_path / "rain", get_task("deraining"), count=5, size=48)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "model": TINY_RESTORMER, "task": "deraining", "data": {
        "train": str(tmp_path / "rain" / "train"), "val": str(tmp_path / "rain" / "val"), "patch_size": 32, "batch_size": 2}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [str(Path(sys.executable).parent / "restorch"), "bench", "data", "--spec", str(spec), "--patch", "32",
               "--batch", "2", "--batches", "3", "--workers", "1", "--repeats", "1", "--warmup", "0",
               "--folder", str(tmp_path / "bench"), "--tracking-uri", uri]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # DeepSpeed stays out of pytest
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cache warm: hit" in done.stdout and "train step: restormer" in done.stdout
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(BENCHMARK_EXPERIMENT).experiment_id])
    metrics = run.data.metrics
    for case in ("before: decode per crop", "cache cold: first decode", "cache warm: hit"):
        assert metrics[f"{case}.crops_per_s"] > 0 and metrics[f"{case}.startup_s"] > 0
        assert metrics[f"{case}.x_before"] == pytest.approx(metrics[f"{case}.crops_per_s"] /
                                                            metrics["before: decode per crop.crops_per_s"])
    assert metrics["cache warm: hit.workers"] == 1 and metrics["before: decode per crop.workers"] == 0
    assert metrics["train step: restormer at batch 1.images_per_s"] > 0  # 1 image per step on the CPU by default
    # the dataset was decoded into the benchmark's own cache, once
    assert len([p for p in (tmp_path / "bench" / "cache" / "decoded").iterdir() if p.is_dir()]) == 1
