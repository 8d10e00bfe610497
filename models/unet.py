"""The U-shaped skeleton shared by Restormer, HINT and LAformer.

Four levels (widths dim, 2dim, 4dim, 8dim at H, H/2, H/4, H/8), a decoder that mirrors levels 3
and 2, a full-resolution decoder level 1 and refinement at 2*dim, and a global residual. What a
block is (which attention, which feed-forward) is the model's choice: the skeleton calls
`make_block(stage, width, heads)` for every block of every stage.

Each forward pass creates a fresh *forward context*, a dict that the blocks of that pass share
(HINT carries its inter-layer attention cache in it). It is passed to every module that sets
`uses_forward_context = True`, as the second argument of its forward; nothing in it outlives the
call, so the same input always gives the same output (unless a model overrides `forward_context`:
HINT's reference mode keeps one for the model's lifetime, as the authors' code does).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from models.layers import Downsample, Upsample, pad_to_multiple

# Stages in forward order; a level's decoder reuses its encoder's heads.
STAGES = ("encoder1", "encoder2", "encoder3", "latent", "decoder3", "decoder2", "decoder1", "refinement")
# Stage -> the level it belongs to (the granularity of per-level options and parameter counts).
STAGE_LEVEL = {
    "encoder1": "level1", "decoder1": "level1", "refinement": "level1",
    "encoder2": "level2", "decoder2": "level2",
    "encoder3": "level3", "decoder3": "level3",
    "latent": "latent",
}  # fmt: skip
LEVELS = ("level1", "level2", "level3", "latent")
_MODULE_STAGE = {
    "encoder_level1": "encoder1", "encoder_level2": "encoder2", "encoder_level3": "encoder3",
    "latent": "latent", "decoder_level3": "decoder3", "decoder_level2": "decoder2",
    "decoder_level1": "decoder1", "refinement": "refinement",
}  # fmt: skip

BlockFactory = Callable[[str, int, int], nn.Module]
ForwardContext = dict[str, Any]


def call_with_context(module: nn.Module, x: torch.Tensor, context: ForwardContext | None) -> torch.Tensor:
    """module(x), or module(x, context) if the module asks for the forward context."""
    return module(x, context) if getattr(module, "uses_forward_context", False) else module(x)


class Stage(nn.Sequential):
    """The blocks of one stage, run in order with the forward context."""

    def forward(self, x: torch.Tensor, context: ForwardContext | None = None) -> torch.Tensor:
        for block in self:
            x = call_with_context(block, x, context)
        return x


def expand_per_level(value: str | Sequence[str], option: str) -> dict[str, str]:
    """One value for all levels, or a list of 4 (levels 1, 2, 3, latent) -> {stage: value}."""
    values = [value] * len(LEVELS) if isinstance(value, str) else list(value)
    if len(values) != len(LEVELS):
        raise ValueError(
            f"{option} must be one name or a list of {len(LEVELS)} (levels 1, 2, 3, latent), got {value!r}"
        )
    per_level = dict(zip(LEVELS, values))
    return {stage: per_level[level] for stage, level in STAGE_LEVEL.items()}


class UNetSkeleton(nn.Module):
    # H and W must be multiples of this (three 2x downsamplings); other sizes are reflect-padded.
    size_multiple = 8

    def __init__(
        self,
        make_block: BlockFactory,
        inp_channels: int,
        out_channels: int,
        dim: int,
        num_blocks: Sequence[int],
        num_refinement_blocks: int,
        heads: Sequence[int],
        bias: bool,
        dual_pixel_task: bool,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (levels 1, 2, 3, latent), got {num_blocks}, {heads}")
        if dual_pixel_task and inp_channels != 6:
            raise ValueError(f"dual_pixel_task takes the 6-channel dual-pixel input; set inp_channels: 6 (got {inp_channels})")

        def stage(name: str, width: int, num_heads: int, count: int) -> Stage:
            return Stage(*(make_block(name, width, num_heads) for _ in range(count)))

        self.dual_pixel_task = dual_pixel_task
        self.patch_embed = nn.Conv2d(inp_channels, dim, 3, padding=1, bias=False)
        self.encoder_level1 = stage("encoder1", dim, heads[0], num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage("encoder2", dim * 2, heads[1], num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage("encoder3", dim * 4, heads[2], num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage("latent", dim * 8, heads[3], num_blocks[3])
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = stage("decoder3", dim * 4, heads[2], num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = stage("decoder2", dim * 2, heads[1], num_blocks[1])
        self.up2_1 = Upsample(dim * 2)
        # Level 1 keeps the concatenated 2*dim channels (no reduction), at full resolution.
        self.decoder_level1 = stage("decoder1", dim * 2, heads[0], num_blocks[0])
        self.refinement = stage("refinement", dim * 2, heads[0], num_refinement_blocks)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, 1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        padded, (height, width) = pad_to_multiple(image, self.size_multiple)
        # Channels-last (NHWC) maps: oneDNN's convolutions run about 1.5x faster forward+backward on
        # CPU than on NCHW (and GPUs prefer it too); the convolutions keep the layout they are given.
        padded = padded.contiguous(memory_format=torch.channels_last)
        context = self.forward_context()
        embedded = self.patch_embed(padded)
        enc1 = self.encoder_level1(embedded, context)
        enc2 = self.encoder_level2(self.down1_2(enc1), context)
        enc3 = self.encoder_level3(self.down2_3(enc2), context)
        latent = self.latent(self.down3_4(enc3), context)
        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)), context)
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)), context)
        dec1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1), context), context)
        if self.dual_pixel_task:
            out = self.output(dec1 + self.skip_conv(embedded))
        else:
            out = self.output(dec1) + padded
        return out[..., :height, :width]

    def forward_context(self) -> ForwardContext:
        """The dict the blocks of one forward pass share: a fresh one per call."""
        return {}

    @staticmethod
    def level_of(parameter_name: str) -> str:
        """The level a parameter belongs to ('other' for the stem, samplers and output)."""
        stage = _MODULE_STAGE.get(parameter_name.split(".", 1)[0])
        return STAGE_LEVEL[stage] if stage else "other"
