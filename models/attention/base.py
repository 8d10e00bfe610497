"""What every channel attention shares: the head layout, the output projection, the temperature.

In channel self-attention (Restormer's MDTA and its variants) the *tokens* are the C/h channels of
a head and each token's features are its H*W pixel values, so the attention map is (C/h x C/h) and
costs O(C^2 HW / h) instead of O((HW)^2 C).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def conv_projection(in_channels: int, out_channels: int, bias: bool) -> nn.Sequential:
    """MDTA's projection: 1x1 conv (mixes channels) then 3x3 depthwise conv (local spatial context)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias), depthwise_conv3x3(out_channels, bias))


def depthwise_conv3x3(channels: int, bias: bool) -> nn.Conv2d:
    """The 3x3 depthwise half of MDTA's projection."""
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=bias)


class ChannelAttention(nn.Module):
    """Base class. Subclasses take `(dim, num_heads, bias, **options)`: their extra keyword
    arguments and defaults are the options a model config can set (see models/attention/__init__.py)."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"{type(self).__name__}: num_heads={num_heads} must divide the width dim={dim}")
        self.dim = dim
        self.num_heads = num_heads
        # One learnable temperature per head, initialised to 1 (no 1/sqrt(d) scaling).
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, heads, C/heads, H*W), a view of x in either memory layout.

        On a channels-last map the result keeps its pixel-major strides: the matrix products below
        take such strided operands directly, so no copy of q, k or v is made.
        """
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last):
            return x.permute(0, 2, 3, 1).reshape(b, h * w, self.num_heads, c // self.num_heads).permute(0, 2, 3, 1)
        return x.reshape(b, self.num_heads, c // self.num_heads, h * w)

    def merge_heads(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, heads, C/heads, H*W) -> (B, C, H, W) in channels-last layout (free for a pixel-major x)."""
        b, heads, d, _ = x.shape
        return x.permute(0, 3, 1, 2).reshape(b, height, width, heads * d).permute(0, 3, 1, 2)


_NORM_EPS = 1e-12  # F.normalize's clamp on the norm


class _CosineLogits(torch.autograd.Function):
    """(q/|q|) (k/|k|)^T * temperature with a hand-written backward (see cosine_logits)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
        inverse_norms = 1.0 / (q_norm.clamp_min(_NORM_EPS) * k_norm.clamp_min(_NORM_EPS).transpose(-2, -1))
        cosine = (q @ k.transpose(-2, -1)) * inverse_norms
        ctx.save_for_backward(q, k, temperature, q_norm, k_norm, inverse_norms, cosine)
        return cosine * temperature

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, temperature, q_norm, k_norm, inverse_norms, cosine = ctx.saved_tensors
        grad_cosine = grad * temperature
        grad_temperature = (grad * cosine).sum_to_size(temperature.shape)
        # cos_ij = q_i.k_j / (|q_i||k_j|):  d/dq_i = sum_j g_ij k_j / (|q_i||k_j|) - q_i sum_j g_ij cos_ij / |q_i|^2
        # (the second term vanishes where the norm was clamped, as in F.normalize's backward).
        # Under autocast q and k are bf16 while the norms and the gradient are fp32, and backward runs
        # outside autocast: the products take q's and k's dtype, as autocast gave them in forward.
        weights = (grad_cosine * inverse_norms).to(q.dtype)
        weighted_cosine = grad_cosine * cosine
        along_q = (weighted_cosine.sum(-1, keepdim=True) / q_norm.clamp_min(_NORM_EPS).square() * (q_norm > _NORM_EPS)).to(q.dtype)
        along_k = (weighted_cosine.sum(-2).unsqueeze(-1) / k_norm.clamp_min(_NORM_EPS).square() * (k_norm > _NORM_EPS)).to(k.dtype)
        # Products computed pixel-major (like q and k from a channels-last map), so the gradients
        # keep that layout and reach the projection convolution without a copy.
        grad_q = torch.addcmul(pixel_major_product(weights, k), q, along_q, value=-1)
        grad_k = torch.addcmul(pixel_major_product(weights.transpose(-2, -1), q), k, along_k, value=-1)
        return grad_q, grad_k, grad_temperature


def cosine_logits(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(q/|q|) (k/|k|)^T * temperature, q (B, h, d, HW) and k (B, h, d', HW) L2-normalised over HW.

    Fused: the raw (d x d') product is divided by the outer product of the norms, so the normalised
    q and k (each as large as the feature map) are never materialised, forward or backward. Norms
    are clamped at 1e-12 as in F.normalize.
    """
    return _CosineLogits.apply(q, k, temperature)


def pixel_major_product(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (B, heads, d, d') @ v (B, heads, d', H*W), computed as (v^T weights^T)^T.

    The result has pixel-major (channels-last) strides, so merge_heads turns it into the
    channels-last map the next convolution wants without a copy (for one head).
    """
    return (v.transpose(-2, -1) @ weights.transpose(-2, -1)).transpose(-2, -1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise each channel token over its H*W features (the last axis)."""
    return F.normalize(x, dim=-1)


def seeded_normal(shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Standard-normal tensor that depends only on (shape, seed): the same on every call and device.

    Used for the random projections of the Performer- and Reformer-style baselines, whose size
    depends on H*W and so cannot be a fixed parameter. Drawn on the CPU for reproducibility across
    devices; on the meta device (profiling) only the shape matters.
    """
    if like.device.type == "meta":
        return torch.empty(shape, device="meta", dtype=like.dtype)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)
