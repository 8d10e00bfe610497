"""What every channel attention shares: the head layout, the output projection, the temperature.

In channel self-attention (Restormer's MDTA and its variants) the *tokens* are the C/h channels of
a head and each token's features are its H*W pixel values, so the attention map is (C/h x C/h) and
costs O(C^2 HW / h) instead of O((HW)^2 C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_projection(in_channels: int, out_channels: int, bias: bool) -> nn.Sequential:
    """MDTA's projection: 1x1 conv (mixes channels) then 3x3 depthwise conv (local spatial context)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=bias),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=bias),
    )


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
        """(B, C, H, W) -> (B, heads, C/heads, H*W)."""
        b, c, h, w = x.shape
        return x.reshape(b, self.num_heads, c // self.num_heads, h * w)

    def merge_heads(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, heads, C/heads, H*W) -> (B, C, H, W)."""
        b, heads, d, _ = x.shape
        return x.reshape(b, heads * d, height, width)


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
