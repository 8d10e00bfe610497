"""S-MSA: MST++'s spectral-wise multi-head self-attention (Cai et al., NTIRE 2022 winner).

Channel attention with heads of a fixed width (31 in MST++): q, k, v are plain linear maps of each
pixel (1x1 convs, no bias), q and k are L2-normalised over HW, attention = softmax(K Q^T * rescale)
per head, out = attention V; a linear projection with bias, plus a positional branch on V:
dwconv3x3(GELU(dwconv3x3(V))). `bias` applies to q/k/v; the output projection always has a bias,
as in MST++.
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention.base import ChannelAttention, cosine_logits, pixel_major_product


class SpectralSelfAttention(ChannelAttention):
    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__(dim, num_heads, bias=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.pos_emb = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False),
            nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q_map, k_map, v_map = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (self.split_heads(t) for t in (q_map, k_map, v_map))
        out = pixel_major_product(cosine_logits(k, q, self.temperature).softmax(dim=-1), v)
        return self.project_out(self.merge_heads(out, height, width)) + self.pos_emb(v_map)
