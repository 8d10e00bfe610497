"""Command groups of the `restorch` CLI, one module each (see orchestrator/cli.py)."""
from orchestrator.commands import demo, models

COMMAND_MODULES = [demo, models]
