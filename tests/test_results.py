"""Sweep results: ranking, the Pareto set, and what Tune sees of a diverged trial."""
from __future__ import annotations

import math

from orchestrator.report.results import pareto_front, sort_rows
from orchestrator.run.trial_reports import DIVERGED_SCORE, scored_for_tune


def test_a_diverged_trial_ranks_last_and_tune_sees_the_worst_score():
    rows = [{"trial": "a", "psnr": 25.0}, {"trial": "nan", "psnr": math.nan}, {"trial": "b", "psnr": 27.0},
            {"trial": "none", "psnr": None}]
    assert [row["trial"] for row in sort_rows(rows, "psnr", "max")][:2] == ["b", "a"]
    assert [row["trial"] for row in sort_rows(rows, "psnr", "min")][:2] == ["a", "b"]

    seen = scored_for_tune({"psnr": math.nan, "loss": math.nan, "iteration": 3}, {"psnr": "max"})
    assert seen["psnr"] == DIVERGED_SCORE["max"] and seen["diverged"] and seen["iteration"] == 3
    assert scored_for_tune({"mrae": math.inf}, {"mrae": "min"})["mrae"] == DIVERGED_SCORE["min"]
    healthy = {"psnr": 26.0, "loss": 0.1}
    assert scored_for_tune(healthy, {"psnr": "max"}) is healthy


def test_pareto_front_keeps_the_rows_nothing_beats_on_both():
    rows = [{"psnr": 27.0, "gmacs": 2.0}, {"psnr": 26.0, "gmacs": 1.0}, {"psnr": 25.0, "gmacs": 1.5},
            {"psnr": 27.0, "gmacs": 2.5}]
    assert pareto_front(rows, {"psnr": "max", "gmacs": "min"}) == rows[:2]
