"""RELA: rank-enhanced linear attention over pixels (LAformer, seed 002).

Multi-head attention whose tokens are the N = H*W pixels (d = C/heads features per head), with a
positive feature map phi instead of the softmax:

    q, k, v = split(conv1x1(x))
    out_n = sum_m (phi(q_n) . phi(k_m)) v_m / sum_m (phi(q_n) . phi(k_m))
          = (phi(K)^T V)^T phi(q_n) / (sum_m phi(k_m)) . phi(q_n)

phi(K)^T V (d x d per head) is computed first, so no N x N map is ever formed: time and memory
grow linearly in H*W. The implicit map D^-1 phi(Q) phi(K)^T has rank <= d. RELA adds a depthwise
k x k conv of V on the image grid to the attention output (out + DWConv(V)): per channel a sparse
N x N term that restores the rank (`effective_attention_maps` / `attention_rank` expose this).

Feature maps (`feature_map`), all positive and softmax-free:
    relu      max(x, 0)
    elu1      elu(x) + 1   (strictly positive)
    softplus  log(1 + e^x) (strictly positive, smooth)

Interpretations (the paper's code is not public):
- q, k, v come from a plain 1x1 conv (no depthwise conv as in MDTA), so with rank_enhance off the
  module has no spatial conv at all: vanilla linear attention.
- The normaliser gets eps = 1e-6, for pixels where phi(q) . phi(k) is zero everywhere (ReLU).
- RELA's conv follows the model's `bias`; the 1x1 output projection is MDTA's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS = {"relu": F.relu, "elu1": elu1, "softplus": F.softplus}


class RankEnhancedLinearAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool,
        feature_map: str = "relu",
        rank_enhance: bool = True,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"rela: num_heads={num_heads} must divide the width dim={dim}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"rela.feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"rela.kernel_size must be an odd number >= 1, got {kernel_size}")
        self.num_heads = num_heads
        self.feature_map = FEATURE_MAPS[feature_map]
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.rank_conv = (
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias) if rank_enhance else None
        )
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, heads, C/heads, H*W)."""
        batch, channels, height, width = x.shape
        return x.reshape(batch, self.num_heads, channels // self.num_heads, height * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q, k = self.feature_map(self.split_heads(q)), self.feature_map(self.split_heads(k))
        kv = k @ self.split_heads(v).transpose(-2, -1)  # (B, heads, d, d): the pixels are summed out first
        normaliser = k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q  # (B, heads, 1, N)
        out = ((kv.transpose(-2, -1) @ q) / (normaliser + EPS)).reshape(x.shape)
        if self.rank_conv is not None:
            out = out + self.rank_conv(v)
        return self.project_out(out)

    def effective_attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, N, N): per channel, the N x N map taking its V values to the output before the projection.

        The normalised attention map of the channel's head, plus (with RELA) the matrix of the
        channel's depthwise conv (its bias, an offset, is left out). Builds N x N matrices: for
        analysis at small sizes only.
        """
        batch, channels, height, width = x.shape
        pixels = height * width
        q, k, _ = self.qkv(x).chunk(3, dim=1)
        scores = self.feature_map(self.split_heads(q)).transpose(-2, -1) @ self.feature_map(self.split_heads(k))
        maps = (scores / (scores.sum(dim=-1, keepdim=True) + EPS)).repeat_interleave(channels // self.num_heads, dim=1)
        if self.rank_conv is None:
            return maps
        # Column n of a channel's conv matrix is the conv's response to a one-hot image at pixel n.
        one_hot = torch.eye(pixels, dtype=x.dtype, device=x.device).reshape(pixels, 1, height, width)
        responses = F.conv2d(
            one_hot.expand(pixels, channels, height, width),
            self.rank_conv.weight,
            padding=self.rank_conv.padding,
            groups=channels,
        )
        return maps + responses.reshape(pixels, channels, pixels).permute(1, 2, 0)

    def attention_rank(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) numerical ranks of the effective maps: at most C/heads without RELA."""
        return torch.linalg.matrix_rank(self.effective_attention_maps(x))
