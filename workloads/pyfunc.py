"""A trained restoration model as an MLflow pyfunc model: what the model registry stores.

The model holds `model.pt` (the consolidated weights and the model config) and rebuilds the network
from the registry on load: no Ray, no DeepSpeed. `predict` takes a float32 NCHW batch in [0, 1] of
any batch size and image size and returns the restored batch (reflect-padded to the network's size
multiple and cropped back).
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from workloads.inference import restore
from workloads.train import load_consolidated

WEIGHTS_ARTIFACT = "weights"


class RestorationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.network = load_consolidated(context.artifacts[WEIGHTS_ARTIFACT])

    # No type hints on predict: MLflow would read them as a schema and override the tensor signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        multiple = getattr(self.network, "size_multiple", 8)
        return restore(self.network, batch, multiple=multiple).numpy()


def image_signature(in_channels: int, out_channels: int) -> ModelSignature:
    """Float32 NCHW in and out, with batch, height and width left free (-1)."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_channels, -1, -1))]),
    )
