"""Parameter and MAC counts of a model at a given input size, without running a real image.

Two MAC counts, because the field uses both:
- conv_gmacs: multiply-accumulates of convolution and linear layers only, the convention of the
  `thop` counter that the papers' "FLOPs" column uses (Restormer: 140.99 G at 256x256). Counted from
  each layer's shapes: out.numel() * in_channels / groups * kernel size (a transposed conv:
  in.numel() * out_channels / groups * kernel size, its true count; old thop overcounts it).
- total_gmacs: every matmul too (attention maps included), from torch's FlopCounterMode / 2.
The model is copied to the meta device and run on a meta tensor: shapes only, no memory, no data,
the same numbers on every call.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True)
class ModelProfile:
    params: int
    params_per_level: dict[str, int]
    conv_gmacs: float
    total_gmacs: float
    input_shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "params_per_level": dict(self.params_per_level),
            "conv_gmacs": self.conv_gmacs,
            "total_gmacs": self.total_gmacs,
            "input_shape": list(self.input_shape),
        }


def _layer_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.ConvTranspose2d):
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def count_params(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Total parameters and their split by level (the model's `level_of`, else top-level module)."""
    level_of = getattr(model, "level_of", lambda name: name.split(".", 1)[0])
    per_level: dict[str, int] = defaultdict(int)
    for name, parameter in model.named_parameters():
        per_level[level_of(name)] += parameter.numel()
    return sum(per_level.values()), dict(per_level)


def input_channels(model: nn.Module) -> int:
    """Channels of the model's first layer (its input image)."""
    first = next(m for m in model.modules() if isinstance(m, _LAYER_TYPES))
    return first.in_channels if not isinstance(first, nn.Linear) else first.in_features


def profile_model(model: nn.Module, size: int | tuple[int, int] = 256, batch: int = 1) -> ModelProfile:
    height, width = (size, size) if isinstance(size, int) else size
    shape = (batch, input_channels(model), height, width)
    params, per_level = count_params(model)

    meta_model = copy.deepcopy(model).to("meta").eval()
    layer_macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal layer_macs
        layer_macs += _layer_macs(module, inputs, output)

    hooks = [m.register_forward_hook(count) for m in meta_model.modules() if isinstance(m, _LAYER_TYPES)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flop_counter:
            meta_model(torch.empty(shape, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return ModelProfile(
        params=params,
        params_per_level=per_level,
        conv_gmacs=layer_macs / 1e9,
        total_gmacs=flop_counter.get_total_flops() / 2 / 1e9,
        input_shape=shape,
    )


def activation_bytes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the tensors a forward pass keeps for backward, parameters excluded: its activation
    memory, counted from tensor sizes (the same on every machine, unlike resident memory)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(tensor, nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x.requires_grad_())
    return total


PROFILE_SIZE = 256  # input size of the model-size metrics sweeps and ablations log (the papers' tables use 256x256)


def size_metrics(model_config: dict[str, Any], size: int = PROFILE_SIZE) -> dict[str, float]:
    """params_m, conv_gmacs, total_gmacs of the model a config builds (shapes only, on the meta device)."""
    from models.registry import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    profile = profile_model(model, size=size)
    return {"params_m": profile.params / 1e6, "conv_gmacs": profile.conv_gmacs, "total_gmacs": profile.total_gmacs}
