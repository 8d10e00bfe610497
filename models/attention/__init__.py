"""Attentions, each a drop-in `nn.Module(dim, num_heads, bias, **options)`: (B, C, H, W) -> same.

All are channel attentions except RELA, a linear attention over pixels. HINT's HMHA
(models/attention/hmha.py) is not one of them: its head count is set by its subspace ratios and it
shares a cache across blocks, so HINT builds it directly.

A module's options are its keyword arguments after `bias`, with their defaults; a model config sets
them under the attention's name, e.g. `{"attention": "glmha", "glmha": {"kv_reduction": 0.75}}`.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from models.attention.csa import ChannelSelfAttention
from models.attention.glmha import GuidedLowRankAttention
from models.attention.linformer import LinformerAttention
from models.attention.performer import PerformerAttention
from models.attention.reformer import ReformerAttention
from models.attention.rela import RankEnhancedLinearAttention
from models.attention.smsa import SpectralSelfAttention

ATTENTIONS: dict[str, type[nn.Module]] = {
    "csa": ChannelSelfAttention,
    "glmha": GuidedLowRankAttention,
    "linformer": LinformerAttention,
    "performer": PerformerAttention,
    "reformer": ReformerAttention,
    "rela": RankEnhancedLinearAttention,
    "smsa": SpectralSelfAttention,
}

_CONSTRUCTOR_ARGS = ("self", "dim", "num_heads", "bias")


def attention_class(name: str) -> type[nn.Module]:
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid attentions: {', '.join(sorted(ATTENTIONS))}")
    return ATTENTIONS[name]


def attention_options(name: str) -> dict[str, Any]:
    """The options an attention accepts, with their defaults."""
    parameters = inspect.signature(attention_class(name).__init__).parameters
    return {key: p.default for key, p in parameters.items() if key not in _CONSTRUCTOR_ARGS}


def validate_attention_options(name: str, options: dict[str, Any]) -> None:
    valid = attention_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{key} (default {value!r})" for key, value in valid.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for attention {name!r}; valid options: {listing}")


def build_attention(name: str, dim: int, num_heads: int, bias: bool, **options: Any) -> nn.Module:
    validate_attention_options(name, options)
    return attention_class(name)(dim, num_heads, bias, **options)
