"""The MLflow layer: runs, the model registry, the tracking server, tag and metric names.

Sweeps stored before the orchestrator was grouped into packages name `orchestrator.tracking.TrialStatusCallback`
(then a module) in their pickled Tune state; it is found here, imported only when asked for (start-up time).
"""


def __getattr__(name: str) -> object:
    if name == "TrialStatusCallback":
        from orchestrator.tracking.runs import TrialStatusCallback

        return TrialStatusCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
