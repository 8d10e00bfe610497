"""Restoration models: attention modules, architectures, the registry and the profiler.

Importing the package registers every architecture, so `build_model` knows them all.
"""
from models import hint, laformer, mst_plus_plus, restormer  # noqa: F401  (registration)
from models.registry import build_model, list_models, model_defaults

__all__ = ["build_model", "list_models", "model_defaults"]
