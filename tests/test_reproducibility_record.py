"""The reproducibility record (orchestrator/tracking/record.py) on the runs restorch opens: a sweep's or an
ablation's parent run, a `restorch train` job's run, a trial's run and a benchmark run; the ablation report's
footer and its warnings on arms that are not comparable. MLflow runs are opened by the real functions on a
sqlite store; the arms' numbers are logged as the workers log them (no training: see test_report.py's
trained ablation for that path)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import TINY_RESTORMER, two_factor_ablation
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.report.build import build_report, table_files
from orchestrator.run.benchmarks import log_benchmark
from orchestrator.spec.ablation import spec_variants
from orchestrator.spec.load import parse_spec
from orchestrator.tracking.keys import (ABLATION_TAG, DATA_DIGEST_PREFIX, DEVICE_TAG, DTYPE_TAG, GIT_COMMIT_TAG,
                                        GIT_DIFF_ARTIFACT, GIT_DIRTY_TAG, GPUS_TAG, LATEX_FILE, MARKDOWN_FILE,
                                        PACKAGES_ARTIFACT, PARENT_TAG, RECORD_ARTIFACTS, RUN_SEED_TAG, THREADS_TAG,
                                        TIMING_TAG, VARIANT_TAG)
from orchestrator.tracking.record import folder_digest, source_state
from orchestrator.tracking.runs import open_job_run, open_sweep_run, open_trial_run
from workloads.synth import write_dataset
from workloads.tasks import get_task

# Slow-marked as a module: with these, `make test` took 6 min on 2 cores (budget 5); CI runs them.
pytestmark = pytest.mark.slow


def spec_for(name: str, data: Path, tmp_path: Path, **sections: object) -> dict:
    return {"name": name, "model": dict(TINY_RESTORMER), "task": "deraining",
            "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 2},
            "train": {"iterations": 4, "val_every": 2, "seed": 7}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "storage": {"path": str(tmp_path / "runs")}, **sections}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One folder for the module: its dataset (data/) and its MLflow store (mlflow.db: made once, it takes seconds)."""
    folder = tmp_path_factory.mktemp("record")
    write_dataset(folder / "data", get_task("deraining"), count=4, size=16, val_fraction=0.5)
    return folder


@pytest.fixture
def data(folder) -> Path:
    return folder / "data"


def artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, RECORD_ARTIFACTS)}


def test_job_sweep_and_trial_runs_carry_the_record(data, folder, tmp_path):
    spec = parse_spec(spec_for("recorded", data, folder))
    job = open_job_run(spec, str(tmp_path / "runs" / "recorded"))
    client = MlflowClient(job["uri"])
    tags = client.get_run(job["run_id"]).data.tags
    assert tags[RUN_SEED_TAG] == "7" and tags[DTYPE_TAG] == "auto"
    assert tags[DEVICE_TAG] == "1 worker(s) on cpu" and tags[THREADS_TAG] == "1 CPU(s) per worker" and tags[GPUS_TAG] == "0"
    train_digest = tags[f"{DATA_DIGEST_PREFIX}data.train"]
    assert train_digest == f"{folder_digest(data / 'train')} {data / 'train'}"
    assert tags[f"{DATA_DIGEST_PREFIX}data.val"].endswith(str(data / "val"))
    commit, diff = source_state()  # ("", "") outside a git checkout
    assert tags.get(GIT_COMMIT_TAG) == (commit or None) and tags.get(GIT_DIRTY_TAG) == (str(bool(diff)) if commit else None)
    assert artifacts(client, job["run_id"]) == {PACKAGES_ARTIFACT, *([GIT_DIFF_ARTIFACT] if diff else [])}
    packages = client.download_artifacts(job["run_id"], PACKAGES_ARTIFACT, str(tmp_path))
    assert "mlflow==" in Path(packages).read_text()

    sweep = open_sweep_run(spec, str(tmp_path / "runs" / "sweep"), resume=False)
    assert client.get_run(sweep["parent_run_id"]).data.tags[f"{DATA_DIGEST_PREFIX}data.train"] == train_digest
    trial_id, _ = open_trial_run(sweep, "t1", "trial-1")
    trial = client.get_run(trial_id).data.tags
    assert trial.get(GIT_COMMIT_TAG) == tags.get(GIT_COMMIT_TAG) and PACKAGES_ARTIFACT in artifacts(client, trial_id)


def test_a_folder_digest_follows_its_files_without_reading_them(data):
    before = folder_digest(data / "train")
    assert folder_digest(data / "train") == before
    image = next((data / "train" / "input").iterdir())
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert folder_digest(data / "train") != before


def test_benchmark_runs_record_their_timing_protocol(folder):
    settings = {"size": 64, "device": "cpu", "dtype": "fp32", "compile": False, "repeats": 3, "warmup": 1}
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tags = MlflowClient(uri).get_run(log_benchmark("models", [{"model": "restormer", "forward_ms": 1.0}], settings, uri)).data.tags
    assert tags[TIMING_TAG] == ("synchronised (CPU calls are synchronous), warm-up 1 round(s), 3 timed round(s) interleaved "
                                "across the variants, median; input 64x64, batch 1, on cpu")
    assert tags[DTYPE_TAG] == "fp32" and tags.get(GIT_COMMIT_TAG) == (source_state()[0] or None)


def ablation(name: str, data: Path, folder: Path, arms: dict[str, tuple[int, Path]]) -> MlflowClient:
    """An ablation's parent run opened as `restorch ablate` opens it, and a finished run per arm as its workers
    log them: label -> (the last iteration, the training folder); other arms: iteration 4 on data/train."""
    spec = parse_spec(spec_for(name, data, folder, ablation=two_factor_ablation()))
    tracking = open_sweep_run(spec, str(folder / "runs" / name), resume=False)
    client = MlflowClient(tracking["uri"])
    client.set_tag(tracking["parent_run_id"], ABLATION_TAG, name)
    for index, variant in enumerate(spec_variants(spec)):
        last, train = arms.get(variant.label, (4, data / "train"))
        run_id = client.create_run(tracking["experiment_id"], tags={PARENT_TAG: tracking["parent_run_id"],
                                                                     VARIANT_TAG: variant.label}).info.run_id
        client.log_batch(run_id, metrics=[Metric("iteration", step, 0, step) for step in (2, last)]
                         + [Metric("psnr", 20.0 + index, 0, last), Metric("ssim", 0.5, 0, last)],
                         params=[Param("data.train", str(train)), Param("data.val", str(data / "val"))])
        client.set_terminated(run_id)
    return client


def test_report_flags_arms_with_other_iterations_or_data_and_shows_the_record(data, folder):
    client = ablation("arms", data, folder, {"GLMHA": (2, data / "train"), "Performer": (4, data / "val")})
    report = build_report(client, "arms")
    assert len(report.warnings) == 2
    assert "different iteration counts (CSA: 4, GLMHA: 2, Performer: 4" in report.warnings[0]
    assert f"Performer: data.train={data / 'val'}" in report.warnings[1]
    files = table_files(report)
    markdown = files[MARKDOWN_FILE]
    assert "- Warning: the arms ran different iteration counts" in markdown
    assert "- Warning: the arms read different data" in markdown
    assert "Reproducibility record: git commit: " in markdown and "seed: 7" in markdown
    assert "metrics from checkpoint: last, iteration 2; last, iteration 4" in markdown
    assert f"data digests: data.train {folder_digest(data / 'train')}" in markdown
    assert files[LATEX_FILE].startswith("% Warning: the arms ran different iteration counts")

    comparable = build_report(ablation("same", data, folder, {}), "same")
    assert comparable.warnings == [] and "Warning" not in table_files(comparable)[MARKDOWN_FILE]
