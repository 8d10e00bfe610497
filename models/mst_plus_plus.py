"""MST++ (Cai et al., NTIRE 2022 spectral reconstruction winner): RGB -> 31-band cube.

conv_in 3x3 (3 -> 31) -> three single-stage U-shaped transformers (MST) -> conv_out 3x3, plus
conv_in's features. Each MST: embedding 3x3 conv, `depth` encoder levels (blocks, then a 4x4
stride-2 conv doubling the width), a bottleneck, a mirrored decoder (2x2 stride-2 transposed conv
with bias, concat with the skip, 1x1 fuse, blocks), a mapping 3x3 conv and a residual.
Block: x = attention(x) + x (no norm before the attention); x = FFN(LN(x)) + x.
Heads are `head_dim` (31) channels wide, so a level of width C has C / 31 heads.
The attention is S-MSA by default; `attention: glmha` swaps in GLMHA (all convs stay bias-free).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.attention import build_attention
from models.layers import ChannelLayerNorm, pad_to_multiple
from models.registry import register_model


class SpectralFeedForward(nn.Module):
    """1x1 conv C -> 4C, GELU, 3x3 depthwise, GELU, 1x1 conv 4C -> C, no bias."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpectralBlock(nn.Module):
    def __init__(self, attention: nn.Module, dim: int) -> None:
        super().__init__()
        self.attn = attention
        self.norm = ChannelLayerNorm(dim)
        self.ffn = SpectralFeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x) + x
        return self.ffn(self.norm(x)) + x


class SingleStageTransformer(nn.Module):
    """One U-shaped MST stage of MST++."""

    def __init__(self, dim: int, depth: int, num_blocks: Sequence[int], head_dim: int, make_attention: Any) -> None:
        super().__init__()

        def blocks(width: int, count: int) -> nn.Sequential:
            return nn.Sequential(*(SpectralBlock(make_attention(width, width // head_dim), width) for _ in range(count)))

        self.embedding = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        width = dim
        for level in range(depth):
            self.encoder.append(blocks(width, num_blocks[level]))
            self.downsample.append(nn.Conv2d(width, width * 2, 4, stride=2, padding=1, bias=False))
            width *= 2
        self.bottleneck = blocks(width, num_blocks[-1])
        self.upsample = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upsample.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
            self.fuse.append(nn.Conv2d(width, width // 2, 1, bias=False))
            self.decoder.append(blocks(width // 2, num_blocks[level]))
            width //= 2
        self.mapping = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.embedding(x)
        skips = []
        for blocks, down in zip(self.encoder, self.downsample):
            features = blocks(features)
            skips.append(features)
            features = down(features)
        features = self.bottleneck(features)
        for up, fuse, blocks, skip in zip(self.upsample, self.fuse, self.decoder, reversed(skips)):
            features = blocks(fuse(torch.cat([up(features), skip], dim=1)))
        return self.mapping(features) + x


@register_model("mst_plus_plus")
class MSTPlusPlus(nn.Module):
    size_multiple = 8

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 31,
        dim: int = 31,
        num_stages: int = 3,
        depth: int = 2,
        num_blocks: Sequence[int] = (1, 1, 1),
        head_dim: int = 31,
        attention: str = "smsa",
        attention_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if len(num_blocks) != depth + 1:
            raise ValueError(f"num_blocks needs depth + 1 = {depth + 1} entries (levels, then bottleneck), got {num_blocks}")
        if out_channels != dim:
            raise ValueError(f"MST++ adds conv_in's features to the output: out_channels must equal dim ({dim})")
        if dim % head_dim:
            raise ValueError(f"dim={dim} must be a multiple of head_dim={head_dim}")
        options = (attention_options or {}).get(attention, {})

        def make_attention(width: int, num_heads: int) -> nn.Module:
            return build_attention(attention, width, num_heads, False, **options)

        self.conv_in = nn.Conv2d(inp_channels, dim, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            *(SingleStageTransformer(dim, depth, num_blocks, head_dim, make_attention) for _ in range(num_stages))
        )
        self.conv_out = nn.Conv2d(dim, out_channels, 3, padding=1, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        padded, (height, width) = pad_to_multiple(image, self.size_multiple)
        features = self.conv_in(padded)
        out = self.conv_out(self.body(features)) + features
        return out[..., :height, :width]

    @staticmethod
    def level_of(parameter_name: str) -> str:
        """'stage1'..'stageN' for the U-shaped stages, 'other' for conv_in/conv_out."""
        parts = parameter_name.split(".")
        return f"stage{int(parts[1]) + 1}" if parts[0] == "body" else "other"
