"""Restormer (Zamir et al., CVPR 2022) with a pluggable channel attention per level.

Block: x = x + attention(LN(x)); x = x + GDFN(LN(x)). The default attention is MDTA ("csa"); any
attention of models/attention can replace it, on all levels or per level (levels 1, 2, 3, latent;
decoder levels use their encoder level's choice, refinement follows level 1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.attention import build_attention
from models.layers import ChannelLayerNorm, GatedDconvFeedForward
from models.registry import register_model
from models.unet import ForwardContext, UNetSkeleton, call_with_context, expand_per_level

LAYERNORM_TYPES = ("WithBias", "BiasFree")


def layer_norm(dim: int, layernorm_type: str) -> ChannelLayerNorm:
    """Restormer's channel LayerNorm: "WithBias", or "BiasFree" (no mean subtraction, for denoising)."""
    if layernorm_type not in LAYERNORM_TYPES:
        raise ValueError(f"layernorm_type must be one of {', '.join(LAYERNORM_TYPES)}, got {layernorm_type!r}")
    return ChannelLayerNorm(dim, bias=layernorm_type == "WithBias")


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, attention: nn.Module, ffn_expansion_factor: float, bias: bool, layernorm_type: str) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim, layernorm_type)
        self.attn = attention
        self.norm2 = layer_norm(dim, layernorm_type)
        self.ffn = GatedDconvFeedForward(dim, ffn_expansion_factor, bias)
        # An attention that shares state across blocks (HINT's cache) gets the forward context.
        self.uses_forward_context = getattr(attention, "uses_forward_context", False)

    def forward(self, x: torch.Tensor, context: ForwardContext | None = None) -> torch.Tensor:
        x = x + call_with_context(self.attn, self.norm1(x), context)
        return x + self.ffn(self.norm2(x))


@register_model("restormer")
class Restormer(UNetSkeleton):
    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layernorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        attention: str | Sequence[str] = "csa",
        attention_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        stage_attention = expand_per_level(attention, "attention")
        options = attention_options or {}

        def make_block(stage: str, width: int, num_heads: int) -> nn.Module:
            name = stage_attention[stage]
            attn = build_attention(name, width, num_heads, bias, **options.get(name, {}))
            return TransformerBlock(width, attn, ffn_expansion_factor, bias, layernorm_type)

        super().__init__(
            make_block, inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads, bias, dual_pixel_task
        )
