"""Ray Tune's schedulers, where a sweep needs them to behave otherwise.

HyperBand (synchronous), with brackets that close once filled. Ray's `_Bracket.filled()` counts the bracket's
live trials. Once a bracket has halved its trials and its last ones have ended, it has fewer live trials than
its size again, and Tune adds every new trial to it: at its last rung, so every later trial runs to max_t and
HyperBand degenerates into random search (ray-project/ray#12536, closed unfixed). Seen here with trials run
one at a time: of 34 BOHB trials, 26 ran all 9 iterations where HyperBand's brackets let 12 do so. The
schedulers below close a bracket once it has held its full number of trials, or has halved them: a new trial
then starts a new bracket.

Median stopping, keyed by trial id. Ray's MedianStoppingRule keeps each trial's results under its Trial object;
a resumed sweep rebuilds the rule's state from the stored reports (orchestrator/run/sweep_resume.py) before
Tune hands it the restored Trial objects, so the state must be found by the id both share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandForBOHB, HyperBandScheduler, MedianStoppingRule
from ray.tune.schedulers.hyperband import _Bracket


class _ClosingBracket(_Bracket):
    def filled(self) -> bool:
        halved = self._n < self._n0
        return halved or len(self._all_trials) >= self._n0 or super().filled()

    def cleanup_full(self, tune_controller: Any) -> None:
        """The bracket is done: stop the trials it paused at its last rung, and those still being paused, as Ray's
        halving does for the trials it drops. (Ray's stops the PAUSED ones only: one whose pause is under way
        would stay paused in a finished bracket, and the sweep would wait for it forever. Two synthetic sweeps
        of 34 trials, two at a time, hung so before this: every trial's work done, Tune waiting, none running.)"""
        for trial in self.current_trials():
            if trial.status == Trial.PAUSED or trial.is_saving:
                tune_controller.stop_trial(trial)


class _ClosingBrackets:
    """Mixin over a HyperBand scheduler: its brackets are `_ClosingBracket`s, and a trial's report at max_t is never
    paused (Ray pauses it until the rest of its bracket gets there: it would start again only to end)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.PAUSE and result.get(self._time_attr, 0) >= self._max_t_attr:
            return self.CONTINUE  # the trial's last report: it ends by itself, and its bracket goes on without it
        return action

    def _create_bracket(self, s: int) -> _Bracket:
        return _ClosingBracket(time_attr=self._time_attr, max_trials=self._get_n0(s), init_t_attr=self._get_r0(s),
                               max_t_attr=self._max_t_attr, eta=self._eta, s=s,
                               stop_last_trials=self._stop_last_trials)


class HyperBand(_ClosingBrackets, HyperBandScheduler):
    """`search.scheduler: hyperband`."""


class HyperBandBOHB(_ClosingBrackets, HyperBandForBOHB):
    """`search.scheduler: bohb` (with TuneBOHB, which learns from the budgets at its rungs)."""


@dataclass(frozen=True)
class _TrialKey:
    """What MedianStoppingRule needs of a trial: a key (and its id, for its log lines)."""
    trial_id: str


class MedianStopping(MedianStoppingRule):
    """`search.scheduler: median`. A trial with too few others to compare it with goes on: Ray's rule would pause
    it while other trials wait for resources (even with a min_time_slice, its first pause is free), and a paused
    trial starts again from its last checkpoint."""

    def _on_insufficient_samples(self, tune_controller: Any, trial: Any, time: float) -> str:
        return self.CONTINUE

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, _TrialKey(trial.trial_id))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return super().on_trial_result(tune_controller, _TrialKey(trial.trial_id), result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, _TrialKey(trial.trial_id), result)
