"""Old module path of orchestrator/run/progress.py. Sweeps stored before the orchestrator was grouped into
packages name it in their pickled Tune state (the progress callback), so they still resume."""
from orchestrator.run.progress import SweepProgress  # noqa: F401
