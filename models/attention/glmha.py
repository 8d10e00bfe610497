"""GLMHA: instance-guided low-rank multi-head self-attention (seed 001, equations 3-7).

    Q  = W_Q X                               (3)   1x1 conv + 3x3 depthwise, as in MDTA
    A  = phi_calibrate(Q)                    (4)   one calibration value per channel, in [-1, 1]
    X' = X + X * (alpha A)                   (5)   channel-wise re-weighting of the input
    K' = W_K' X',  V' = W_V' X'              (6)   C' = C (1 - r) channels only
    Z  = softmax(Q K'^T / beta) V' (+ X)     (7)   per head a (C/h x C'/h) map: output keeps C channels

Interpretations taken (the paper leaves them open, and has no public code):
- phi_calibrate: adaptive max-pool of Q to `pool_size` x `pool_size` -> depthwise
  `dw_kernel` x `dw_kernel` conv + GELU -> a linear layer over the pooled positions (p*p -> 1,
  shared by all channels) -> tanh. A is per sample, so X' is calibrated per instance. A literal
  reading with a global pool and a C x C linear layer adds back the parameters the K/V reduction
  saves, contradicting the paper's counts; this reading keeps params and MACs below them.
- W_K', W_V' are one 1x1 conv C -> 2C' followed by a 3x3 depthwise conv (MDTA's projection);
  the 1x1 conv applies X' = X (1 + alpha A) by scaling its weight columns per sample instead of
  the input (the same product, without a full pass over X forward and two backward);
  q and K' are L2-normalised over HW and 1/beta is MDTA's learnable per-head temperature.
- C' = C (1 - r) rounded to the nearest multiple of the head count (every head gets C'/h key
  channels); a reduction that leaves no channel is an error.
- The "+ X" of eq. 7 is the transformer block's residual connection, not repeated here; the heads
  are concatenated and projected by a 1x1 conv as in MDTA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import (ChannelAttention, conv_projection, cosine_logits, depthwise_conv3x3,
                                   pixel_major_product)
from models.layers import channel_chunks


def reduced_width(dim: int, num_heads: int, kv_reduction: float) -> int:
    """C' = C (1 - r), rounded to the nearest multiple of the head count."""
    if not 0.0 <= kv_reduction < 1.0:
        raise ValueError(f"glmha.kv_reduction must be in [0, 1), got {kv_reduction}")
    width = int(dim * (1.0 - kv_reduction) / num_heads + 0.5) * num_heads
    if width == 0:
        raise ValueError(
            f"glmha.kv_reduction={kv_reduction} leaves no key/value channel at width {dim} with "
            f"{num_heads} heads (C' = {dim * (1 - kv_reduction):.2f} rounds to 0); use a smaller reduction"
        )
    return width


class Calibration(nn.Module):
    """phi_calibrate: (B, C, H, W) query -> (B, C) calibration vector A in [-1, 1]."""

    def __init__(self, dim: int, pool_size: int, dw_kernel: int) -> None:
        super().__init__()
        if pool_size < 1 or dw_kernel < 1 or dw_kernel % 2 == 0:
            raise ValueError(
                f"glmha: pool_size must be >= 1 and dw_kernel an odd number >= 1, got pool_size={pool_size}, "
                f"dw_kernel={dw_kernel}"
            )
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.dwconv = nn.Conv2d(dim, dim, dw_kernel, padding=dw_kernel // 2, groups=dim)
        self.compress = nn.Linear(pool_size * pool_size, 1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        pooled = F.gelu(self.dwconv(self.pool(q)))
        return torch.tanh(self.compress(pooled.flatten(2))).squeeze(-1)


class ScaledInputPointwiseConv(nn.Conv2d):
    """1x1 conv of `x * scale[:, :, None, None]` for a per-sample channel scale (B, C_in).

    Computed as one batched matrix product of the pixels with the weight scaled per sample,
    (W diag(scale_b)) x_b, so the scaled input is never materialised. A channels-last x is read in
    place and the output is channels-last.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        weight = self.weight[None, :, :, 0, 0] * scale[:, None, :]  # (B, C_out, C_in)
        out = torch.bmm(x.permute(0, 2, 3, 1).reshape(b, h * w, c), weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)


class GuidedLowRankAttention(ChannelAttention):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool,
        alpha: float = 0.6,
        kv_reduction: float = 0.5,
        pool_size: int = 8,
        dw_kernel: int = 3,
    ) -> None:
        super().__init__(dim, num_heads, bias)
        self.alpha = alpha
        self.kv_width = reduced_width(dim, num_heads, kv_reduction)
        self.q = conv_projection(dim, dim, bias)
        self.calibrate = Calibration(dim, pool_size, dw_kernel)
        # MDTA's projection (1x1 then 3x3 depthwise), its 1x1 conv taking the calibration scale.
        self.kv = nn.Sequential(ScaledInputPointwiseConv(dim, self.kv_width * 2, bias),
                                depthwise_conv3x3(self.kv_width * 2, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q = self.q(x)
        scale = 1.0 + self.alpha * self.calibrate(q)  # X' = X + X (alpha A) = X (1 + alpha A)
        pointwise, depthwise = self.kv
        k, v = (self.split_heads(t) for t in channel_chunks(depthwise(pointwise(x, scale)), 2))
        q = self.split_heads(q)
        out = pixel_major_product(cosine_logits(q, k, self.temperature).softmax(dim=-1), v)
        return self.project_out(self.merge_heads(out, height, width))
