"""HINT (Zhou et al., seed 000): Restormer's skeleton with hierarchical multi-head attention + QKCU.

The authors' layout, one config for all tasks: encoder levels 1-3 have no attention (x + GDFN(LN(x))),
the latent level has 6 blocks, and the latent, decoder 3/2/1 and refinement blocks are Restormer
blocks with HMHA+QKCU in place of MDTA: 26 attention blocks, 24,873,812 parameters by default.
Stem, samplers, skips, GDFN and LayerNorm are Restormer's (models/unet.py, models/restormer.py).

Config: `hmha: {subspace_ratios, rerank, rank_scope, compat}` and `qkcu: {intra, inter}`; keys left
out keep their defaults, described in models/attention/hmha.py. Every attention level has
len(subspace_ratios) heads, and the ratios must split every attention level's width (2*dim, 4*dim,
8*dim) into whole channel counts.

`hmha.compat` chooses between two forwards with the same parameters (24,873,812 by default):
- "corrected" (default): restorch's HINT. Use it to train and to compare models.
- "reference": the authors' forward (github.com/joshyZhou/HINT, basicsr/models/archs/HINT_arch.py),
  which their released weights need to give their published numbers. It differs in four ways:
  1. the inter-layer cache survives the call and the next call starts from it, as the authors' model
     keeps `self.qv_cache` and their test scripts call it image after image (batch 1, names in
     natsorted order, one GPU); it starts empty at construction and `reset_cache()` empties it; it
     is not in the state_dict (nor in theirs);
  2. an attention block that finds no cache (the latent's first block on the first call) leaves
     its maps unmodulated (corrected: modulates with a zero cache);
  3. the cache update adds floor(bilinear(A_i) * c_i / C) per head, the authors' `* c_i // dim`,
     which is 0 wherever a map entry lies in [0, 1) (corrected: true division);
  4. channels are ranked on the batch-mean query with torch.corrcoef and an unstable sort, and the
     cache holds batch means, so a sample's output depends on its batch-mates (corrected: the same
     with rank_scope "batch"; rank_scope "sample" removes the coupling; reference needs "batch").
  The authors' checkpoints load with models/official_weights.py.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from models.attention.hmha import HierarchicalMultiHeadAttention, check_subspace_ratios
from models.layers import GatedDconvFeedForward
from models.registry import option_group, register_model
from models.restormer import TransformerBlock, layer_norm
from models.unet import ForwardContext, UNetSkeleton

ATTENTION_FREE_STAGES = ("encoder1", "encoder2", "encoder3")


def _hmha_defaults(*keys: str) -> Mapping[str, Any]:
    parameters = inspect.signature(HierarchicalMultiHeadAttention).parameters
    return MappingProxyType({key: parameters[key].default for key in keys})


HMHA_DEFAULTS = _hmha_defaults("subspace_ratios", "rerank", "rank_scope", "compat")
QKCU_DEFAULTS = _hmha_defaults("intra", "inter")


class FeedForwardBlock(nn.Module):
    """HINT's attention-free encoder block: x + GDFN(LN(x))."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str) -> None:
        super().__init__()
        self.norm = layer_norm(dim, layernorm_type)
        self.ffn = GatedDconvFeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


@register_model("hint")
class HINT(UNetSkeleton):
    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 6),
        num_refinement_blocks: int = 4,
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layernorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        hmha: Mapping[str, Any] = HMHA_DEFAULTS,
        qkcu: Mapping[str, Any] = QKCU_DEFAULTS,
    ) -> None:
        options = {**option_group("hmha", hmha, HMHA_DEFAULTS), **option_group("qkcu", qkcu, QKCU_DEFAULTS)}
        num_heads = len(check_subspace_ratios(options["subspace_ratios"]))

        def make_block(stage: str, width: int, heads: int) -> nn.Module:
            if stage in ATTENTION_FREE_STAGES:
                return FeedForwardBlock(width, ffn_expansion_factor, bias, layernorm_type)
            try:
                attention = HierarchicalMultiHeadAttention(width, heads, bias, **options)
            except ValueError as error:
                raise ValueError(f"hint {stage} blocks: {error}") from error
            return TransformerBlock(width, attention, ffn_expansion_factor, bias, layernorm_type)

        super().__init__(
            make_block,
            inp_channels,
            out_channels,
            dim,
            num_blocks,
            num_refinement_blocks,
            [num_heads] * 4,
            bias,
            dual_pixel_task,
        )
        self.carries_cache = options["compat"] == "reference"
        self.carried_context: ForwardContext = {}

    def forward_context(self) -> ForwardContext:
        return self.carried_context if self.carries_cache else {}

    def reset_cache(self) -> None:
        """Empty the cache that reference mode carries from call to call."""
        self.carried_context.clear()
