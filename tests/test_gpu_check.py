"""benchmarks/gpu_check.sh, the check to run the day a GPU is lent: its dry run on the CPU (tiny
models, a few steps) prints the whole table and writes it as CSV, so the script cannot rot."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.profile import size_metrics

# Slow-marked as a module: with these, `make test` took 6 min on 2 cores (budget 5); CI runs them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # a script, not a package
_spec.loader.exec_module(gpu_check)


def run_check(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--folder", str(tmp_path / "work"),
                           *options], env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=900)
    with (out / gpu_check.CSV_NAME).open() as file:
        return done, list(csv.DictReader(file))


@pytest.mark.slow  # 15-50 s on 2 cores: keeps `make test` under 5 minutes
def test_dry_run_prints_every_row_and_writes_the_csv(tmp_path):
    done, rows = run_check(tmp_path, "--skip-train", "--skip-compile", "--peak-tflops", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    settings = gpu_check.dry_run_settings(480)
    expected = [gpu_check.case_row(case, settings) for case in gpu_check.plan(settings, compile=False)]
    assert [{key: row[key] for key in expected[0]} for row in rows] == [
        {key: str(value) if value != "largest" else str(settings.max_batch) for key, value in row.items()} for row in expected]
    assert {row["precision"] for row in rows} == {"bf16", "fp32"} and {row["layout"] for row in rows} == {"channels_last", "nchw"}
    assert {row["patch"] for row in rows} == {"32", "16"} and all(row["status"] == "ok" for row in rows)
    for row in rows:
        batch, step_s = int(row["batch"]), float(row["step_ms"]) / 1000
        assert float(row["images_s"]) == pytest.approx(batch / step_s)
        # MFU: 3 x the profiler's forward FLOPs (2 per MAC) per step / step time / the peak (1 TFLOP/s here)
        gmacs = size_metrics(settings.models[row["model"]], size=int(row["patch"]))["total_gmacs"]
        assert float(row["mfu"]) == pytest.approx(3 * 2e9 * gmacs * batch / step_s / 1e12, rel=1e-6)
        assert float(row["peak_mem_gb"]) > 0 and 0 <= float(row["data_wait"]) < 1 and int(row["data_steps"]) >= 1
    # the largest batch: nothing runs out of memory on the CPU, so the search stops at its cap
    assert [row["note"] for row in rows].count(f"largest that fits up to the cap {settings.max_batch}") == 4
    # the printed table holds the same rows
    table = done.stdout[done.stdout.index("\nmodel "):]
    assert table.splitlines()[1].split()[:3] == ["model", "patch", "batch"] and table.count("channels_last") == 10
    assert f"{len(rows)} of {len(rows)} rows ok" in done.stdout


def test_the_largest_batch_search_doubles_then_bisects_and_names_where_it_stopped():
    tried = []

    def fits(batch: int) -> str | None:
        tried.append(batch)
        return None if batch <= 37 else "OutOfMemoryError: CUDA out of memory"

    assert gpu_check.largest_batch(fits, 8, 512, probes=9) == (36, "largest that fits; batch 38: OutOfMemoryError: "
                                                                    "CUDA out of memory")
    assert tried == [8, 16, 32, 64, 48, 40, 36, 38]
    assert gpu_check.largest_batch(lambda batch: None, 8, 100, probes=9) == (100, "largest that fits up to the cap 100")
    assert gpu_check.largest_batch(lambda batch: None, 8, 10**6, probes=3) == (32, "largest that fits in 3 tries")
    with pytest.raises(RuntimeError, match="batch 8 does not fit: OutOfMemoryError"):
        gpu_check.largest_batch(lambda batch: "OutOfMemoryError", 8, 512, probes=9)


def test_the_peak_comes_from_the_gpu_name():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == 362.0 and gpu_check.peak_bf16_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_bf16_tflops("Tesla T4") is None


def test_the_train_jobs_figures_come_from_its_final_metrics_line():
    line = "final metrics: {'iteration': 2, 'images_per_s': np.float64(3.5), 'peak_memory_mb': 512.25, 'psnr': nan}"
    assert gpu_check.final_metric(line, "images_per_s") == 3.5 and gpu_check.final_metric(line, "peak_memory_mb") == 512.25
    assert gpu_check.final_metric(line, "ssim") is None


def test_a_failed_or_overlong_row_is_a_row_of_the_table(tmp_path):
    def forever() -> dict:
        while True:
            pass

    table = gpu_check.Table(str(tmp_path))
    gpu_check.timed_row(table, {"model": "broken"}, 60, lambda: {"images_s": 1 / 0})
    gpu_check.timed_row(table, {"model": "stuck"}, 0.5, forever)
    gpu_check.timed_row(table, {"model": "fine"}, 60, lambda: {"images_s": 2.0})
    assert [(row["model"], row["status"]) for row in table.rows] == [("broken", "failed"), ("stuck", "failed"), ("fine", "ok")]
    assert table.rows[0]["note"] == "ZeroDivisionError: division by zero"
    assert table.rows[1]["note"] == "RowTimeout: ran past its 0.5 s limit"
    assert (tmp_path / gpu_check.CSV_NAME).read_text().count("\n") == 4  # header and the rows so far


def test_a_spent_budget_skips_rows_and_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--dry-run", "--budget-s", "1", "--folder", str(tmp_path / "work")]) == 1
    finally:
        torch.set_num_threads(threads)  # the dry run sets one thread
    with (tmp_path / gpu_check.CSV_NAME).open() as file:
        rows = list(csv.DictReader(file))
    assert rows[0]["model"] == gpu_check.TRAIN_ROW and len(rows) == 15  # the job, 12 rows, 2 compiled
    assert all(row["status"] == "skipped" and row["note"] == "the 1 s budget is spent" for row in rows)


def test_without_a_gpu_it_says_to_use_the_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2 and "--dry-run" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_compiles_and_runs_the_train_job_to_a_loadable_model(tmp_path):
    from workloads.train import load_consolidated

    done, rows = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train, *measured = rows
    assert train["model"] == gpu_check.TRAIN_ROW and train["status"] == "ok" and float(train["images_s"]) > 0
    assert [row["compile"] for row in measured[-2:]] == ["eager", "eager"] and len(measured) == 14
    model = load_consolidated(train["note"].removeprefix("model.pt loaded: "))
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
