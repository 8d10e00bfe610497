"""Linformer-style channel attention (a GLMHA-paper baseline).

Linformer shortens the key/value sequence with learned projections E, F (k x n). In channel
attention the sequence is the d = C/h channel tokens of a head, so K~ = E K and V~ = F V have
`proj_len` = k tokens and the attention map is (d x k). E and F are shared by the heads of a layer
(Linformer's head-wise sharing). K is L2-normalised before the projection so that q . K~ stays on
MDTA's scale. At these short sequence lengths the full-size q, k, v are still computed, so the
saving is small: the point the GLMHA paper makes.
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention.base import ChannelAttention, conv_projection, l2_normalize, pixel_major_product


class LinformerAttention(ChannelAttention):
    def __init__(self, dim: int, num_heads: int, bias: bool, proj_len: int = 24) -> None:
        super().__init__(dim, num_heads, bias)
        if proj_len < 1:
            raise ValueError(f"linformer.proj_len must be >= 1, got {proj_len}")
        head_dim = dim // num_heads
        self.qkv = conv_projection(dim, dim * 3, bias)
        self.project_k = nn.Linear(head_dim, proj_len, bias=False)
        self.project_v = nn.Linear(head_dim, proj_len, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=1))
        # (B, h, d, HW) -> (B, h, k, HW): project along the channel-token axis.
        k = torch.einsum("kd,bhdn->bhkn", self.project_k.weight, l2_normalize(k))
        v = torch.einsum("kd,bhdn->bhkn", self.project_v.weight, v)
        attn = (l2_normalize(q) @ k.transpose(-2, -1)) * self.temperature
        out = pixel_major_product(attn.softmax(dim=-1), v)
        return self.project_out(self.merge_heads(out, height, width))
