"""Resume is result-neutral: an ASHA sweep whose driver is SIGKILLed and then run again with the same command
ends with the same trials stopped at the same iterations and the same best trial as the uninterrupted sweep
(orchestrator/run/sweep_resume.py). One trial at a time, so the uninterrupted sweep is itself deterministic: the
good lr runs first and sets the rungs' bars, the hopeless ones are stopped at the first rung."""
from __future__ import annotations

import csv
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import yaml
from conftest import tiny_spec
from servers import BIN, stop_process_group

from orchestrator.spec.schema import SpecError
from orchestrator.spec.load import parse_spec
from orchestrator.run.sweep import _scheduler
from orchestrator.run.sweep_resume import StoredReport, check_resumable, rebuild, reports_to_replay, stored_reports
from orchestrator.run.trial_reports import record_report

NAME = "neutral"
LRS = [2e-3, 1.0, 0.5]  # grid order = trial order


ASHA = {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}


def sweep(workdir: Path, data: Path, search: dict | None = None, lrs: list[float] = LRS) -> subprocess.Popen:
    """`restorch sweep` of a grid over `lrs` with the `search` scheduler (ASHA's by default), one trial at a time,
    in `workdir` (its storage and MLflow store there), embedded Ray, own session; run again in the same
    `workdir`, the same command resumes the sweep."""
    workdir.mkdir(exist_ok=True)
    raw = tiny_spec(NAME, data, {"train.lr": {"grid": lrs}}, train={"iterations": 12},
                    search={**(search or ASHA), "max_concurrent_trials": 1}, storage={"path": str(workdir / "runs")})
    (workdir / "spec.yaml").write_text(yaml.safe_dump(raw))
    with open(workdir / "driver.log", "a") as log:
        return subprocess.Popen([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=workdir, env=driver_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def driver_env() -> dict[str, str]:
    """An embedded Ray and the MLflow store in the working directory, whatever this process has."""
    return {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def finish(driver: subprocess.Popen, workdir: Path) -> dict[float, tuple[str, float]]:
    """Wait for the driver; lr -> (status, psnr) from the sweep's results.csv."""
    try:
        assert driver.wait(timeout=900) == 0, (workdir / "driver.log").read_text()[-4000:]
    finally:
        stop_process_group(driver)
    with open(workdir / "runs" / NAME / "results.csv") as results:
        return {float(row["train.lr"]): (row["status"], float(row["psnr"] or "nan")) for row in csv.DictReader(results)}


def jobs(workdir: Path) -> list[Path]:
    """The trials' job folders, in the order they started."""
    folder = workdir / "runs" / NAME / "jobs"
    return sorted(folder.iterdir(), key=lambda path: path.stat().st_ctime) if folder.is_dir() else []


def wait_until(driver: subprocess.Popen, workdir: Path, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 900
    while not ready():
        assert driver.poll() is None, (workdir / "driver.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"never got to the point to kill the driver at: {what}"
        time.sleep(0.2)


def kill(driver: subprocess.Popen, workdir: Path) -> None:
    stop_process_group(driver, grace=0)  # SIGKILL: the driver and its embedded Ray
    assert not (workdir / "runs" / NAME / "results.csv").exists()


def best(results: dict[float, tuple[str, float]]) -> float:
    return max((lr for lr in results if results[lr][1] == results[lr][1]), key=lambda lr: results[lr][1])  # not nan


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_killed_asha_sweep_resumes_to_the_same_answer(derain_data, tmp_path):
    uninterrupted = finish(sweep(tmp_path / "whole", derain_data), tmp_path / "whole")
    print("uninterrupted:", uninterrupted)
    assert uninterrupted[2e-3][0] == "finished"
    assert any(status != "finished" for status, _ in uninterrupted.values()), uninterrupted  # ASHA did stop some

    # Killed (a) once the first trial has reported at both rungs and written its checkpoint at 9, (b) once the
    # second trial's job has started (the first trial finished, its rungs recorded): each resumed sweep must stop
    # the same trials at the same iterations and find the same best trial.
    points = {"first trial at iteration 9": lambda w: any((job / "checkpoint_0000009").is_dir() for job in jobs(w)),
              "second trial started": lambda w: len(jobs(w)) >= 2}
    for index, (what, ready) in enumerate(points.items()):
        workdir = tmp_path / f"killed{index}"
        driver = sweep(workdir, derain_data)
        wait_until(driver, workdir, lambda: ready(workdir), what)
        if index == 0:  # the same sweep started again meanwhile refuses at once, naming the running driver
            second = subprocess.run([str(BIN / "restorch"), "sweep", "spec.yaml"], cwd=workdir, env=driver_env(),
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and f"another driver (pid {driver.pid} on " in second.stderr, second.stderr
        kill(driver, workdir)
        resumed = finish(sweep(workdir, derain_data), workdir)
        print(f"killed when {what}, resumed:", resumed)
        assert "resuming sweep" in (workdir / "driver.log").read_text()
        assert {lr: status for lr, (status, _) in resumed.items()} == \
               {lr: status for lr, (status, _) in uninterrupted.items()}, what
        assert best(resumed) == best(uninterrupted), what


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_killed_median_stopping_sweep_resumes_to_the_same_answer(derain_data, tmp_path):
    """Median stopping over 5 lr values, one trial at a time: the first three (good) run to the end, having too
    few others to be compared with; the two hopeless ones are stopped at their first validation, worse than the
    median of the others. Killed once the fourth trial trains, the resumed sweep stops the same ones: its rule
    is rebuilt with the first three trials' results (a fresh one would let the fourth run to the end)."""
    median, lrs = {"scheduler": "median", "grace_period": 1}, [2e-3, 3e-3, 1e-3, 1.0, 0.5]
    uninterrupted = finish(sweep(tmp_path / "whole", derain_data, median, lrs), tmp_path / "whole")
    print("uninterrupted:", uninterrupted)
    assert [uninterrupted[lr][0].split(" at ")[0] for lr in lrs] == ["finished"] * 3 + ["stopped"] * 2, uninterrupted

    workdir = tmp_path / "killed"
    driver = sweep(workdir, derain_data, median, lrs)
    wait_until(driver, workdir, lambda: len(jobs(workdir)) >= 4, "fourth trial started")
    kill(driver, workdir)
    resumed = finish(sweep(workdir, derain_data, median, lrs), workdir)
    print("resumed:", resumed)
    assert "resuming sweep" in (workdir / "driver.log").read_text()
    assert {lr: status for lr, (status, _) in resumed.items()} == \
           {lr: status for lr, (status, _) in uninterrupted.items()}
    assert best(resumed) == best(uninterrupted)


def asha_spec(data: Path, algorithm: str = "grid") -> object:
    space = {"grid": LRS} if algorithm == "grid" else {"choice": LRS}
    return parse_spec(tiny_spec(NAME, data, {"train.lr": space}, train={"iterations": 12},
                                search={"algorithm": algorithm, "scheduler": "asha", "grace_period": 1,
                                        "reduction_factor": 2, "max_concurrent_trials": 1}))


def test_the_stored_reports_rebuild_ashas_rungs(derain_data, tmp_path):
    """Reports recorded as a trial's job sends them (a re-sent iteration keeps the first record) are read back in
    the order they came, and a fresh ASHA fed them stops what the live one stopped: trial b, worse than a at the
    first rung (3), with its report there; c was judged at rung 3 against a and b and went on."""
    fs, sweep = pyarrow.fs.LocalFileSystem(), str(tmp_path)
    sent = [("a", 3, 20.0), ("a", 6, 22.0), ("a", 9, 23.0), ("a", 12, 24.0), ("b", 3, 10.0), ("b", 6, 30.0),
            ("c", 3, 19.0), ("c", 3, 5.0)]  # b's report at 6 came after its stop; c re-sent 3 after a resume
    for trial, iteration, psnr in sent:
        record_report(fs, sweep, trial, {"iteration": iteration, "psnr": psnr})
    reports = stored_reports(fs, sweep)
    assert [(r.trial_id, r.metrics["iteration"], r.metrics["psnr"]) for r in reports] == sent[:-1]

    spec = asha_spec(derain_data)
    stopped = rebuild(_scheduler(spec), reports, spec.train.iterations)
    assert stopped == {"a": {"iteration": 12, "psnr": 24.0}, "b": {"iteration": 3, "psnr": 10.0}}

    # TPE suggests a trial lost with Tune's unsaved state again under a new id: only restored trials count.
    tpe = asha_spec(derain_data, algorithm="optuna")
    assert {r.trial_id for r in reports_to_replay(tpe, reports, {"a", "c"})} == {"a", "c"}
    assert reports_to_replay(spec, reports, {"a"}) == reports  # grid: a lost trial comes back under its id


def test_the_stored_reports_rebuild_median_stopping(derain_data):
    """Three trials ran to the end: the rule rebuilt from their reports stops a restored fourth trial (another
    object than the one the reports were fed with: the rule keys results by trial id) at its first validation,
    worse than their median, and lets a good one go on; a fresh rule, with none of their results, stops neither."""
    spec = parse_spec(tiny_spec(NAME, derain_data, {"train.lr": {"grid": [2e-3, 3e-3, 1e-3, 1.0, 0.5]}},
                                train={"iterations": 12}, search={"scheduler": "median", "grace_period": 1}))
    psnr = {"a": 20.0, "b": 21.0, "c": 22.0}
    reports = [StoredReport(trial, index * 4 + step, {"iteration": 3 * step, "psnr": value + step})
               for index, (trial, value) in enumerate(psnr.items()) for step in range(1, 5)]
    rebuilt, fresh = _scheduler(spec), _scheduler(spec)
    assert rebuild(rebuilt, reports, spec.train.iterations) == {}  # each ran to the end, as none had enough others
    for scheduler, hopeless in ((rebuilt, "STOP"), (fresh, "CONTINUE")):
        for trial, value in (("d", 5.0), ("e", 30.0)):
            restored = SimpleNamespace(trial_id=trial)
            scheduler.on_trial_add(None, restored)
            expected = hopeless if trial == "d" else "CONTINUE"
            assert scheduler.on_trial_result(None, restored, {"iteration": 3, "psnr": value}) == expected, trial


class SavedTrial:
    def __init__(self, trial_id: str, config: dict, iteration: int) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, {"iteration": iteration}


def test_resume_refuses_lost_values_and_an_unrebuildable_pbt(derain_data):
    spec = asha_spec(derain_data)
    with pytest.raises(SpecError, match="lost trial t2's values of train.lr"):
        check_resumable(spec, "runs/neutral", [SavedTrial("t1", {"train.lr": 2e-3}, 12), SavedTrial("t2", {}, 3)],
                        started=True)

    raw = tiny_spec("pbt", derain_data, {"train.lr": {"grid": [2e-3, 1.0]}}, train={"iterations": 9},
                    search={"scheduler": "pbt", "perturbation_interval": 3,
                            "hyperparam_mutations": {"train.lr": {"loguniform": [1e-3, 1e-2]}}})
    pbt = parse_spec(raw)
    trials = [SavedTrial("t1", {"train.lr": 2e-3}, 9), SavedTrial("t2", {"train.lr": 1.0}, 3)]
    with pytest.raises(SpecError, match="scheduler pbt, whose state Tune does not save"):
        check_resumable(pbt, "runs/pbt", trials, started=True)
    check_resumable(pbt, "runs/pbt", trials, started=False)  # nothing trained yet: the fresh state is the state
    check_resumable(pbt, "runs/pbt", [trials[0], SavedTrial("t2", {"train.lr": 1.0}, 9)], started=True)  # all done
