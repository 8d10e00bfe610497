"""Which searched parameter mattered: Optuna's PED-ANOVA and fANOVA importance of a sweep's finished
trials for one metric.

The trials may come from any search algorithm (grid, random, TPE, PBT...): an in-memory Optuna study is
rebuilt from them (`optuna.trial.create_trial`: the values each trial ran, its final metric) with the
distributions of the spec's search space (grid/choice: categorical; ranges: float or int, log for
loguniform). Only parameters that took two or more values over those trials count; a parameter a trial
did not run with (an inactive conditional option) is left out of that trial: PED-ANOVA weighs it over the
trials that ran it, fANOVA weighs only the parameters every trial ran.

Importances are normalised to sum to 1 per evaluator. fANOVA's random forest is seeded, and the trials
come in a fixed order, so the same trials give the same numbers on every rebuild.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report.results import Row
from orchestrator.spec.schema import Domain

MIN_TRIALS = 2  # fewer finished trials: no importance (Optuna's evaluators would return zeros)
RELIABLE_TRIALS = 20  # fewer: computed, with a warning that it rests on few trials
TARGET_QUANTILE = 0.1  # PED-ANOVA's "top trials": the best 10% (Optuna's default)
EVALUATORS = {"ped_anova": "PED-ANOVA", "fanova": "fANOVA"}  # key (CSV column) -> name
SEED = 0  # fANOVA's forest


@dataclass
class Importance:
    metric: str
    trials: int  # the finished trials with the metric that it rests on
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluator key -> parameter -> importance
    note: str | None = None  # why there are no values, or a warning on the values

    @property
    def parameters(self) -> list[str]:
        """The parameters, most important first (by PED-ANOVA, then fANOVA, then name)."""
        names = {name for values in self.values.values() for name in values}
        return sorted(names, key=lambda name: (*(-values.get(name, 0.0) for values in self.values.values()), name))


def _choice(value: Any) -> Any:
    """A value as an Optuna categorical choice (None, bool, int, float or str): lists and dicts as text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def distribution(domain: Domain, observed: list[Any]) -> Any:
    """The Optuna distribution of a search-space entry, wide enough for every value the trials ran
    (a quniform value rounded past its range's end stays in)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if domain.kind in ("grid", "choice"):
        return CategoricalDistribution(list(dict.fromkeys(_choice(value) for value in [*domain.values, *observed])))
    if domain.kind == "randint":  # Tune's randint excludes its upper end
        return IntDistribution(int(min([domain.values[0], *observed])), int(max([domain.values[1] - 1, *observed])))
    return FloatDistribution(float(min([domain.values[0], *observed])), float(max([domain.values[1], *observed])),
                             log=domain.kind == "loguniform")


def varied(space: list[Domain], rows: list[Row]) -> list[Domain]:
    """The entries of the search space that took two or more values over these trials."""
    return [domain for domain in space
            if len({repr(row[domain.key]) for row in rows if row.get(domain.key) is not None}) > 1]


def scored(rows: list[Row], metric: str) -> list[Row]:
    """The rows with a number for the metric (not missing, not nan)."""
    return [row for row in rows if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])]


def param_importance(space: list[Domain], rows: list[Row], metric: str, mode: str) -> Importance:
    """The importance of each varied parameter of `space` for `metric` ("max" or "min": `mode`), from the
    finished trials' rows (searched key -> value, metric -> final value), in a fixed order."""
    rows = scored(rows, metric)
    importance = Importance(metric, len(rows))
    parameters = varied(space, rows)
    if len(rows) < MIN_TRIALS:
        importance.note = (f"no parameter importance: it needs {MIN_TRIALS} or more finished trials with {metric}, "
                           f"the sweep has {len(rows)}")
    elif len(parameters) < 2:
        what = f"only {parameters[0].key} took" if parameters else "no searched parameter took"
        importance.note = (f"no parameter importance: {what} two or more values over the {len(rows)} finished trials; "
                           "importance compares two or more parameters (one alone explains everything)")
    else:
        importance.values = _evaluate(parameters, rows, metric, mode)
        if len(rows) < RELIABLE_TRIALS:
            top = math.ceil(TARGET_QUANTILE * len(rows))
            importance.note = (f"from {len(rows)} finished trials, fewer than {RELIABLE_TRIALS}: a hint, not a finding "
                               f"(PED-ANOVA's top {TARGET_QUANTILE:.0%} is {top} trial{'s' * (top > 1)}, fANOVA's "
                               f"forest fits {len(rows)} points)")
    return importance


def _evaluate(parameters: list[Domain], rows: list[Row], metric: str, mode: str) -> dict[str, dict[str, float]]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    distributions = {domain.key: distribution(domain, [row[domain.key] for row in rows if row.get(domain.key) is not None])
                     for domain in parameters}
    optuna_logger = logging.getLogger("optuna")
    level = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)  # "A new study created in memory ..."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature and few-trials warnings: the note says it
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for row in rows:
                active = [key for key in distributions if row.get(key) is not None]
                study.add_trial(optuna.trial.create_trial(
                    params={key: _choice(row[key]) for key in active},
                    distributions={key: distributions[key] for key in active}, value=float(row[metric])))
            evaluated = {"ped_anova": get_param_importances(
                study, params=list(distributions), evaluator=PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE))}
            # fANOVA fits the trials that ran every parameter it weighs: those no trial left inactive
            common = [key for key in distributions if all(row.get(key) is not None for row in rows)]
            if len(common) > 1:
                evaluated["fanova"] = get_param_importances(study, params=common,
                                                            evaluator=FanovaImportanceEvaluator(seed=SEED))
            return {key: {name: float(value) for name, value in values.items()} for key, values in evaluated.items()}
    finally:
        optuna_logger.setLevel(level)
