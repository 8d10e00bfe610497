"""Performer-style channel attention: FAVOR+ positive random features (a GLMHA-paper baseline).

softmax(q k^T * t) is replaced by D^-1 phi(Q) (phi(K)^T V) with the positive random features
phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), W ~ N(0, I) of shape (m x HW), so that
E[phi(x) . phi(y)] = exp(x . y). Here x = t * q and y = k with q, k L2-normalised over HW as in
MDTA, which keeps the learnable per-head temperature t. The tokens are the channels of a head and
their features are the H*W pixels, so W depends on the image size: it is drawn from a fixed seed
for every H*W (the same features on every call, no state to save; `seed` picks another draw).
Features are i.i.d. Gaussian (not orthogonalised). The cost saved (d x d map -> d x m) is small
next to the extra projections of q and k onto m features: the GLMHA paper's point.
"""
from __future__ import annotations

import torch

from models.attention.base import ChannelAttention, conv_projection, l2_normalize, seeded_normal


class PerformerAttention(ChannelAttention):
    def __init__(self, dim: int, num_heads: int, bias: bool, num_features: int = 24, seed: int = 0) -> None:
        super().__init__(dim, num_heads, bias)
        if num_features < 1:
            raise ValueError(f"performer.num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.seed = seed
        self.qkv = conv_projection(dim, dim * 3, bias)

    def feature_map(self, x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """phi(x) for x of shape (B, h, d, HW): (B, h, d, m), all entries positive."""
        squared_norm = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ projection.transpose(0, 1) - squared_norm) / self.num_features**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=1))
        projection = seeded_normal((self.num_features, height * width), self.seed, like=q)
        q_features = self.feature_map(l2_normalize(q) * self.temperature, projection)
        k_features = self.feature_map(l2_normalize(k), projection)
        context = k_features.transpose(-2, -1) @ v  # (B, h, m, HW)
        normaliser = q_features @ k_features.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, d, 1)
        out = (q_features @ context) / normaliser
        return self.project_out(self.merge_heads(out, height, width))
