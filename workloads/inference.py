"""Running a restoration model on whole images of any size.

- Padding: U-nets need H and W divisible by their downsampling factor (8 for Restormer); inputs are
  reflect-padded up to it and the output cropped back. With tiles, the whole image is padded once.
- Tiling: an image too large to run at once is cut into overlapping tiles (all of `tile` pixels,
  the last one per axis aligned to the image edge), each run alone, and blended. A tile's weight is 0
  within `overlap // 4` pixels of an edge it shares with a neighbour, rises smoothly (raised cosine)
  over the middle half of the overlap and is 1 elsewhere; image borders are not down-weighted.
  Every output pixel thus comes only from tiles in which it lies at least `overlap // 4` pixels
  inside, so for a local model whose receptive-field radius is at most `overlap // 4` the tiled
  output equals the untiled one, while the smooth ramp hides seams for models with global context.
  Memory then scales with the tile, plus the full-size input, output and weight sum.
- Self-ensemble (x8): the model runs on the 8 flips/rotations of the input, and the outputs, turned
  back, are averaged.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.layers import pad_to_multiple
from workloads.files import IMAGE_SUFFIXES, image_bit_depth, read_image, write_image
from workloads.outputs import check_output_file, check_output_folder

Forward = Callable[[torch.Tensor], torch.Tensor]


def restore(model: Forward, image: torch.Tensor, *, multiple: int = 8, tile: int | None = None,
            overlap: int = 32, self_ensemble: bool = False) -> torch.Tensor:
    """The model's output for an NCHW image batch of any height and width (same H and W out).

    With `tile`, the padded image is processed in tiles of `tile` pixels (a multiple of `multiple`),
    so every tile sees exactly the pixels, padding included, that the whole image would."""
    if image.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(image.shape)}")
    if tile is not None and (tile <= 0 or tile % multiple):
        raise ValueError(f"tile must be a positive multiple of {multiple}, got {tile}")

    body = model if tile is None else functools.partial(run_tiled, model, tile=tile, overlap=overlap)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return run_padded(body, x, multiple)

    with torch.inference_mode():
        return run_self_ensemble(forward, image) if self_ensemble else forward(image)


def run_padded(forward: Forward, image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad H and W up to a multiple of `multiple`, run `forward`, crop back."""
    padded, (height, width) = pad_to_multiple(image, multiple)
    return forward(padded)[..., :height, :width]


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _edge_ramp(size: int, overlap: int, ramp_start: bool, ramp_end: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D tile weight: 0 for the first overlap//4 pixels from a shared edge, a raised cosine over the
    next overlap - 2*(overlap//4), then 1."""
    dead = overlap // 4
    rise = overlap - 2 * dead
    distance = torch.arange(size, dtype=like.dtype, device=like.device)
    ramp = 0.5 - 0.5 * torch.cos(math.pi * ((distance - dead + 1) / (rise + 1)).clamp(0, 1))
    weight = torch.ones(size, dtype=like.dtype, device=like.device)
    if ramp_start:
        weight = weight * ramp
    if ramp_end:
        weight = weight * ramp.flip(0)
    return weight


def run_tiled(forward: Forward, image: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """`forward` on overlapping tile x tile crops of `image`, blended (see the module docstring)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got tile {tile}, overlap {overlap}")
    height, width = image.shape[-2:]
    rows, cols = _tile_starts(height, tile, tile - overlap), _tile_starts(width, tile, tile - overlap)
    output = weight_sum = None
    for top in rows:
        for left in cols:
            patch = forward(image[..., top : top + tile, left : left + tile])
            size_h, size_w = patch.shape[-2:]
            weight = torch.outer(
                _edge_ramp(size_h, overlap, top > 0, top + size_h < height, patch),
                _edge_ramp(size_w, overlap, left > 0, left + size_w < width, patch),
            )
            if output is None:
                output = patch.new_zeros(*patch.shape[:2], height, width)
                weight_sum = patch.new_zeros(height, width)
            output[..., top : top + size_h, left : left + size_w] += patch * weight
            weight_sum[top : top + size_h, left : left + size_w] += weight
    return output.div_(weight_sum)


def run_self_ensemble(forward: Forward, image: torch.Tensor) -> torch.Tensor:
    """Mean of `forward` over the 8 flips/rotations of the image, each output turned back."""
    total = None
    for flip in (False, True):
        flipped = image.flip(-1) if flip else image
        for turns in range(4):
            out = torch.rot90(forward(torch.rot90(flipped, turns, (-2, -1))), -turns, (-2, -1))
            out = out.flip(-1) if flip else out
            total = out if total is None else total + out
    return total / 8


def output_pairs(source: Path, destination: Path, *, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input, output) paths for an image file, or for every image of a folder into a folder (same
    names); refuses outputs that would replace a file without `overwrite`, or land in the input folder."""
    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not inputs:
            raise ValueError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        check_output_folder(destination, option="--output", names=[path.name for path in inputs], inputs=[source],
                            overwrite=overwrite)
        return [(path, destination / path.name) for path in inputs]
    if source.is_file():
        check_output_file(destination, option="--output", inputs=[source], overwrite=overwrite)
        return [(source, destination)]
    raise FileNotFoundError(f"{source} does not exist")


def restore_files(model: torch.nn.Module, pairs: list[tuple[Path, Path]], **options: Any) -> None:
    """Restore each (input, output) image pair of `output_pairs`, keeping each image's bit depth (8 or
    16). `options` go to `restore` (tile, overlap, self_ensemble)."""
    multiple = getattr(model, "size_multiple", 8)
    for src, dst in tqdm(pairs, desc="restoring", unit="image", disable=len(pairs) == 1):
        image = torch.from_numpy(read_image(src).transpose(2, 0, 1).copy())[None]
        output = restore(model, image, multiple=multiple, **options)[0].numpy().transpose(1, 2, 0)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_image(dst, output, bit_depth=image_bit_depth(src) if dst.suffix.lower() in (".png", ".tif", ".tiff") else 8)
