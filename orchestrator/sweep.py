"""Old module path of orchestrator/run/sweep.py. Sweeps stored before the orchestrator was grouped into
packages name it in their pickled Tune state (the trainable, the trial-name function), so they still resume."""
from orchestrator.run.sweep import _trial_name, run_trial  # noqa: F401
