"""Command groups of the `restorch` CLI, one module each (see orchestrator/cli.py)."""
from orchestrator.commands import (ablate, bench, data, demo, evaluate, models, registry, report, serve, spec, submit,
                                   sweep, tracking, train)

COMMAND_MODULES = [demo, bench, models, data, evaluate, train, sweep, ablate, report, spec, submit, tracking, registry,
                   serve]
