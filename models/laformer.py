"""LAformer (Ai et al., seed 002): rank-enhanced linear attention on Restormer's U-shaped skeleton.

Only the abstract is public: a U-shaped restoration transformer whose blocks combine linear attention
(with RELA) and channel attention for global context and a convolutional gated feed-forward network
for local detail, with no softmax and no window shifting. Every choice below is an interpretation:

- Skeleton: Restormer's (models/unet.py) with its defaults: dim 48, blocks (4, 6, 6, 8), 4 refinement
  blocks, heads (1, 2, 4, 8), stem, samplers, skips and global residual unchanged.
- Block:  x = x + CA(RELA(LN(x)));  x = x + GDFN(LN(x))   (LN: Restormer's channel LayerNorm)
- RELA (models/attention/rela.py): multi-head linear attention over all H*W pixels plus a depthwise
  conv on V; global spatial context at a cost linear in H*W, no windows.
- CA, the channel attention: a squeeze-and-excitation gate on RELA's output (global average pool,
  1x1 conv C -> C/channel_reduction, ReLU, 1x1 conv back to C, sigmoid, channel-wise rescale):
  global channel context without a softmax. MDTA-style channel self-attention is not used because it
  needs a softmax, which LAformer avoids.
- Convolutional gated FFN: Restormer's GDFN (1x1 conv, 3x3 depthwise conv, GELU gate, 1x1 conv).

Config: `rela: {feature_map, rank_enhance, kernel_size}` (keys left out keep their defaults) and
`channel_reduction`; `rela: {rank_enhance: false}` is vanilla linear attention, the paper's ablation.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from models.attention import attention_options
from models.attention.rela import RankEnhancedLinearAttention
from models.registry import option_group, register_model
from models.restormer import TransformerBlock
from models.unet import UNetSkeleton

RELA_DEFAULTS = MappingProxyType(attention_options("rela"))


class SqueezeExcitation(nn.Module):
    """Channel attention: x * sigmoid(conv(relu(conv(avgpool(x)))))."""

    def __init__(self, dim: int, reduction: int, bias: bool) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"laformer.channel_reduction must be >= 1, got {reduction}")
        hidden = max(1, dim // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, hidden, 1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(hidden, dim, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


@register_model("laformer")
class LAformer(UNetSkeleton):
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
        channel_reduction: int = 4,
        rela: Mapping[str, Any] = RELA_DEFAULTS,
    ) -> None:
        rela_options = option_group("rela", rela, RELA_DEFAULTS)

        def make_block(stage: str, width: int, num_heads: int) -> nn.Module:
            mixer = nn.Sequential(
                OrderedDict(
                    linear_attention=RankEnhancedLinearAttention(width, num_heads, bias, **rela_options),
                    channel_attention=SqueezeExcitation(width, channel_reduction, bias),
                )
            )
            return TransformerBlock(width, mixer, ffn_expansion_factor, bias, layernorm_type)

        super().__init__(
            make_block, inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads, bias, dual_pixel_task
        )
