"""Small building blocks shared by the U-shaped restoration transformers (Restormer, HINT, LAformer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map, eps 1e-5.

    `bias=False` is Restormer's bias-free form: x / sqrt(var + eps) * weight, without subtracting
    the mean (used for denoising).
    """

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            var = x.var(dim=1, keepdim=True, unbiased=False)
            return x * torch.rsqrt(var + 1e-5) * self.weight[:, None, None]
        # F.layer_norm on a channels-last view: one fused kernel instead of six passes over x
        # (about 2x faster forward+backward on CPU); the result keeps the channels-last strides.
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-5).permute(0, 3, 1, 2)


def channel_chunks(x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """x.chunk(parts, dim=1), with a backward that gathers the gradients in x's channels-last layout.

    chunk's backward concatenates the gradients into a channels-first tensor, which the convolution
    that made x then copies back to channels-last: two full passes over a wide map (3C for q, k, v;
    2 x hidden in the feed-forward). unbind's backward stacks them straight into that layout.
    """
    if not x.is_contiguous(memory_format=torch.channels_last):
        return x.chunk(parts, dim=1)
    pixels = x.permute(0, 2, 3, 1)
    return tuple(t.permute(0, 3, 1, 2) for t in pixels.unflatten(-1, (parts, x.shape[1] // parts)).unbind(-2))


class GatedDconvFeedForward(nn.Module):
    """Restormer's GDFN: 1x1 conv to 2*hidden, 3x3 depthwise, gelu(x1) * x2, 1x1 conv back."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = channel_chunks(self.dwconv(self.project_in(x)), 2)
        # The exact (erf) gelu is about 3x slower on a channel slice with an odd width (255 of 510)
        # than on a dense map; densifying x1 first costs one copy and wins overall.
        return self.project_out(F.gelu(x1.contiguous(memory_format=torch.channels_last)) * x2)


class Downsample(nn.Module):
    """Halve the resolution, double the width: 3x3 conv n -> n/2, then pixel-unshuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the width: 3x3 conv n -> 2n, then pixel-shuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W up to a multiple of `multiple`; returns the padded map and the original size."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        # Reflect padding needs pad < size; replicate covers tiny inputs (e.g. 1-3 pixel images).
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (height, width)

