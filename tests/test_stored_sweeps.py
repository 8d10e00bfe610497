"""Sweeps stored by earlier layouts of restorch still resume. tests/data/premove-sweep.tar.xz is a sweep made
before orchestrator/ was grouped into packages (commit 8634440): 2 grid trials, one at a time, the driver
SIGKILLed while the second trial ran. Its Tune state pickles `orchestrator.sweep.run_trial`,
`orchestrator.progress.SweepProgress` and `orchestrator.tracking.TrialStatusCallback` by module path, so
resuming it needs those old paths (kept as shims). The stored state names absolute paths (the data, the
storage, the MLflow store), so it is unpacked where it was made."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from servers import BIN

ARCHIVE = Path(__file__).parent / "data" / "premove-sweep.tar.xz"
WHERE = Path("/tmp/restorch-premove-sweep")  # where the archive's sweep was made


@pytest.mark.slow
def test_sweep_stored_before_the_packages_resumes():
    shutil.rmtree(WHERE, ignore_errors=True)
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(WHERE.parent, filter="data")
    try:
        assert not (WHERE / "runs" / "premove" / "results.csv").exists()
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        done = subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=WHERE, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "resuming sweep premove" in done.stdout
        assert "trial 8a2f0_00000 started" not in done.stdout  # finished before the kill: not run again
        with open(WHERE / "runs" / "premove" / "results.csv") as results:
            rows = {row["trial"]: row for row in csv.DictReader(results)}
        assert {trial: row["status"] for trial, row in rows.items()} == {"8a2f0_00000": "finished",
                                                                           "8a2f0_00001": "finished"}
        assert all(float(row["psnr"]) > 15 for row in rows.values())
    finally:
        shutil.rmtree(WHERE, ignore_errors=True)
