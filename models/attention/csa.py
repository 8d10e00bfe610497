"""CSA: Restormer's multi-Dconv head transposed attention (MDTA), the baseline every variant replaces.

q, k, v = split(dwconv3x3(conv1x1(x))); per head, q and k are L2-normalised over HW and
attention = softmax(q k^T * temperature) is (C/h x C/h); out = project(attention v).
"""
from __future__ import annotations

import torch

from models.attention.base import ChannelAttention, conv_projection, cosine_logits, pixel_major_product
from models.layers import channel_chunks


class ChannelSelfAttention(ChannelAttention):
    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__(dim, num_heads, bias)
        self.qkv = conv_projection(dim, dim * 3, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = (self.split_heads(t) for t in channel_chunks(self.qkv(x), 3))
        out = pixel_major_product(cosine_logits(q, k, self.temperature).softmax(dim=-1), v)
        return self.project_out(self.merge_heads(out, height, width))
