"""Resume that changes nothing: a resumed sweep's scheduler gets back the state the interrupted one had.

Tune saves a sweep's trials and its searcher (every 10 s or so) but not its scheduler: Tuner.restore
continues with the scheduler as it was pickled when the sweep started. An ASHA sweep resumed with empty
rungs lets the trials it had stopped, or would have stopped, train on, and the best trial can change
(issue 18).

The record: every validation report Tune gets from a trial's job is first stored as
`{sweep}/reports/{trial id}/{iteration:07d}.json`, with the time it came (orchestrator/run/trial_reports.py).
Stored before Tune sees it, this record holds every result the interrupted scheduler acted on, where Tune's
own result.json files in storage lag by up to its save period.

The rebuild (`rebuild`): a fresh scheduler is fed the stored reports in the order they came, as Tune fed
them (`on_trial_add` at a trial's first report, `on_trial_result` for each, `on_trial_complete` after a
stop). What it stops is what the interrupted sweep stopped, or would have stopped had it lived to see the
report; those trials are not run again, their trial reports the stored last result as final
(orchestrator/run/sweep.py, run_trial). A trial that goes on re-reports the iterations after its job's last
checkpoint; any it had reported before are at rungs where it is recorded already, which ASHA passes over.

Which reports: with grid or random search, Tune re-creates a trial that started after its last save under
the same id (the generator's counter is saved), so every stored report counts; TPE suggests such a trial
again under a new id, which trains from scratch, so only reports of trials Tune restored count.

Schedulers: fifo keeps no state; asha's state (each rung's recorded scores) and median's (each trial's
results: orchestrator/run/schedulers.py keys them by trial id) come from results alone and are rebuilt
exactly. hyperband and bohb are not rebuilt: their brackets hold which trials they paused, and when, which no report
records. pbt is not rebuilt: its state also holds the exploitations it made (which trial continued
which checkpoint, with what mutated values) and its random draws, which no report records. A sweep whose
scheduler is not rebuilt (pbt, hyperband, bohb) refuses to resume once it has started training
(`check_resumable`) rather than go on differently.

Known gap: a report whose checkpoint Ray Train committed just before the driver died, before the report was
stored, is neither in the record nor re-run (the job resumes after that checkpoint); ASHA then misses that
trial at that rung if the iteration is one. The window runs from Ray Train's controller registering the
checkpoint to the callback's write, a few milliseconds of the controller's own work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs
from ray.tune.schedulers import TrialScheduler

from orchestrator.spec.conditional import is_active
from orchestrator.spec.schema import ExperimentSpec, SpecError
from orchestrator.run.trial_reports import REPORTS_DIR

REBUILT_SCHEDULERS = ("fifo", "asha", "median")
UNREBUILT_STATE = {"pbt": "the exploitations it made and its random draws",  # why, for the refusal
                   "hyperband": "which trials it paused in which bracket", "bohb": "which trials it paused in which "
                   "bracket, and its model's random draws"}
SAME_ID_SEARCHES = ("random", "grid")  # Tune's BasicVariantGenerator: a lost trial comes back under its id


@dataclass(frozen=True)
class StoredReport:
    trial_id: str
    time: float
    metrics: dict[str, Any]


def stored_reports(fs: pyarrow.fs.FileSystem, sweep_path: str) -> list[StoredReport]:
    """Every report stored in the sweep's folder, in the order they came."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(f"{sweep_path}/{REPORTS_DIR}", recursive=True,
                                                     allow_not_found=True))
    reports = []
    for info in found:
        if info.type != pyarrow.fs.FileType.File or not info.base_name.endswith(".json"):
            continue
        with fs.open_input_stream(info.path) as stream:
            stored = json.loads(stream.read())
        reports.append(StoredReport(Path(info.path).parent.name, stored["time"], stored["metrics"]))
    return sorted(reports, key=lambda report: report.time)


def rebuild(scheduler: TrialScheduler, reports: list[StoredReport], last_iteration: int) -> dict[str, dict[str, Any]]:
    """Feed `reports` to `scheduler` (configured with the sweep's metric and mode) as Tune fed them (a trial's
    report at `last_iteration` is its last: Tune completes the trial); returns the last report of each trial
    it stopped, by trial id."""
    trials: dict[str, SimpleNamespace] = {}
    stopped: dict[str, dict[str, Any]] = {}
    for report in reports:
        if report.trial_id in stopped:  # what its job still reported after the stop, Tune ignored
            continue
        if report.trial_id not in trials:
            trials[report.trial_id] = SimpleNamespace(trial_id=report.trial_id)
            scheduler.on_trial_add(None, trials[report.trial_id])
        trial = trials[report.trial_id]
        action = scheduler.on_trial_result(None, trial, report.metrics)
        if action == TrialScheduler.STOP or report.metrics["iteration"] >= last_iteration:
            scheduler.on_trial_complete(None, trial, report.metrics)
        if action == TrialScheduler.STOP:
            stopped[report.trial_id] = report.metrics
    return stopped


def reports_to_replay(spec: ExperimentSpec, reports: list[StoredReport], restored: set[str]) -> list[StoredReport]:
    """The reports of trials that will be back after the resume (see the module's docstring)."""
    if spec.search.algorithm in SAME_ID_SEARCHES:
        return reports
    return [report for report in reports if report.trial_id in restored]


def check_resumable(spec: ExperimentSpec, folder: str, trials: list[Any], *, started: bool) -> None:
    """Refuse to resume what cannot go on as it was: trials Tune saved without all their values (state written
    while storage was full or failing), or a sweep whose scheduler is not rebuilt (pbt) that had started
    training (`started`: a job is in storage) and not finished every trial. `trials`: Tune's saved trials."""
    searched = spec.searched_keys()
    for trial in trials:
        config = trial.config or {}
        missing = [key for key in searched if config.get(key) is None and is_active(spec.search_space, key, config)]
        if missing:
            raise SpecError(f"the saved state of sweep {spec.name} in {folder} lost trial {trial.trial_id}'s values of "
                            f"{', '.join(missing)} (written while storage was full or failing?); a resume would run it "
                            f"without them. Move {folder} aside and run the sweep again")
    finished = sum((trial.last_result or {}).get("iteration", 0) >= spec.train.iterations for trial in trials)
    scheduler = spec.search.scheduler
    if scheduler not in REBUILT_SCHEDULERS and started and finished < spec.trial_count():
        what = UNREBUILT_STATE.get(scheduler, "its decisions so far")
        raise SpecError(
            f"sweep {spec.name} uses scheduler {scheduler}, whose state Tune does not save and restorch cannot "
            f"rebuild from the stored results ({what}): resumed, it would not go on as the interrupted sweep "
            f"would have. Its trials so far stay in {folder}; run the spec again under a new name (or remove "
            f"{folder}) to start the sweep over")
