"""CSA: Restormer's multi-Dconv head transposed attention (MDTA), the baseline every variant replaces.

q, k, v = split(dwconv3x3(conv1x1(x))); per head, q and k are L2-normalised over HW and
attention = softmax(q k^T * temperature) is (C/h x C/h); out = project(attention v).
"""
from __future__ import annotations

import torch

from models.attention.base import ChannelAttention, conv_projection, l2_normalize


class ChannelSelfAttention(ChannelAttention):
    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__(dim, num_heads, bias)
        self.qkv = conv_projection(dim, dim * 3, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=1))
        attn = (l2_normalize(q) @ l2_normalize(k).transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v
        return self.project_out(self.merge_heads(out, height, width))
