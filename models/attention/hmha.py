"""HMHA + QKCU: HINT's hierarchical multi-head attention with query-key cache updating (seed 000).

HMHA
    q, k, v = split(dwconv3x3(conv1x1(x)))                             as MDTA, each (B, C, H*W)
    rerank: Pearson correlation between the channels of q over H*W; each channel is scored by its
            mean correlation and the channels are sorted by score, highest first; q, k and v are
            permuted the same way (and the permutation is never undone)
    heads of unequal widths c_i = C r_i / sum(r): the default r = (1, 2, 2, 3) gives C/8, C/4, C/4,
            3C/8, the most correlated channels going to the smallest head
    A_i = softmax(l2n(q_i) l2n(k_i)^T * tau_i);  O = concat(A_i v_i);  out = project(O)

QKCU, intra-layer (inside one attention)
    T = concat(l2n(q_i) + l2n(k_i)), detached;  S = O + T
    O = O + Up(Down(GELU(Gate(S)) * S))          Gate C->C, Down C->C/2, Up C/2->C: kernel-1 Conv1d
QKCU, inter-layer (across the attention blocks of one forward pass)
    a C x C cache G, average-pooled to the block's width C when it differs, and per head
    g = avgpool(G to c_i x c_i);  [scale; shift] = Conv1d(c_i -> 2c_i)(g + A_i)
    a = A_i * scale + shift;  a = a * GELU(Conv1d(c_i -> c_i)(a));  A_i = A_i + a
    U = sum_i bilinear(A_i to C x C) * c_i / C  (detached);  G = 0.9 G + 0.1 U

Where restorch departs from the authors' code, on purpose:
- The cache lives in the forward context of models/unet.py: fresh at every forward pass, so the same
  input gives the same output and the state_dict is the whole model state (the reference keeps it
  on the model, across calls and outside checkpoints).
- U weights head i by c_i / C with true division (the reference's floor division zeroes most of U).
- The first attention block of a pass (or the module called on its own) finds no cache: it
  modulates with g = 0, so its inter-layer parameters are used and trained, and starts the cache at
  G = 0.9 U as the reference does. (The reference skips modulation when it has no cache, which
  with a per-pass cache would leave that block's inter-layer parameters untrained.)
- rank_scope: "batch" ranks the channels of the batch-mean query and caches batch-mean maps, as the
  reference does, so the samples of a batch influence each other; "sample" ranks and caches each
  sample on its own, so a sample's output does not depend on its batch-mates.

compat: "reference" undoes the three departures above that live in this module, for the authors'
released weights (models/hint.py lists every difference): no modulation without a cache, U with
floor division, and the ranking computed as the authors compute it (torch.corrcoef and an unstable
sort: a constant channel scores NaN). It needs rank_scope "batch"; HINT carries the cache across calls.

Not registered in models/attention ATTENTIONS: the head count is len(subspace_ratios) rather than a
free num_heads, and the module takes the forward context; HINT (models/hint.py) builds it directly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import conv_projection, l2_normalize
from models.unet import ForwardContext

RANK_SCOPES = ("batch", "sample")
COMPAT_MODES = ("corrected", "reference")
CACHE_KEY = "hmha_inter_layer_cache"
CACHE_MOMENTUM = 0.9


def check_subspace_ratios(ratios: Sequence[int]) -> list[int]:
    """The ratios as a list, if they are a non-empty list of positive integers (one per head)."""
    if not isinstance(ratios, (list, tuple)) or not ratios or not all(isinstance(r, int) and r > 0 for r in ratios):
        raise ValueError(f"hmha.subspace_ratios must be a non-empty list of positive integers, got {ratios!r}")
    return list(ratios)


def subspace_widths(dim: int, ratios: Sequence[int]) -> list[int]:
    """Head widths dim * r_i / sum(r); each must be a whole number of channels."""
    ratios = check_subspace_ratios(ratios)
    total = sum(ratios)
    if any(dim * r % total for r in ratios):
        shares = ", ".join(f"{dim * r / total:g}" for r in ratios)
        multiple = total // math.gcd(total, *ratios)
        raise ValueError(
            f"hmha.subspace_ratios {ratios} split width {dim} into {shares} channels; every head needs a "
            f"whole number of channels, so the width must be a multiple of {multiple}"
        )
    return [dim * r // total for r in ratios]


def channel_order(q: torch.Tensor, per_sample: bool, reference: bool = False) -> torch.Tensor:
    """Channel indices sorted by mean Pearson correlation, highest first.

    q: (B, C, N). Returns (B, C) indices, or (1, C) from the batch-mean query if not per_sample.
    A constant channel gets correlation 0 with every channel (torch.corrcoef would give NaN).
    `reference`: the authors' computation (batch mean, torch.corrcoef, unstable sort), bit for bit.
    """
    q = q.detach()
    if reference:
        return torch.corrcoef(q.mean(dim=0)).mean(dim=1).sort(descending=True).indices[None]
    if not per_sample:
        q = q.mean(dim=0, keepdim=True)
    centered = F.normalize(q - q.mean(dim=-1, keepdim=True), dim=-1)
    correlation = centered @ centered.transpose(-2, -1)
    return correlation.mean(dim=-1).argsort(dim=-1, descending=True, stable=True)


class IntraLayerModulation(nn.Module):
    """QKCU intra-layer: O + Up(Down(GELU(Gate(S)) * S)) with S = O + T."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Conv1d(dim, dim, 1)
        self.down = nn.Conv1d(dim, dim // 2, 1)
        self.up = nn.Conv1d(dim // 2, dim, 1)

    def forward(self, out: torch.Tensor, query_key: torch.Tensor) -> torch.Tensor:
        s = out + query_key
        return out + self.up(self.down(F.gelu(self.gate(s)) * s))


class HeadModulation(nn.Module):
    """QKCU inter-layer, one head: modulates its (c x c) attention map with the cache."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale_shift = nn.Conv1d(width, 2 * width, 1)
        self.gate = nn.Conv1d(width, width, 1)

    def forward(self, attn: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(cache, attn.shape[-1])
        scale, shift = self.scale_shift(pooled + attn).chunk(2, dim=1)
        a = attn * scale + shift
        return attn + a * F.gelu(self.gate(a))


class InterLayerModulation(nn.Module):
    """QKCU inter-layer: reads the cache from the forward context, modulates every head, updates it."""

    def __init__(self, head_widths: Sequence[int], per_sample: bool, reference: bool = False) -> None:
        super().__init__()
        self.head_widths = list(head_widths)
        self.dim = sum(head_widths)
        self.per_sample = per_sample
        self.reference = reference
        self.heads = nn.ModuleList(HeadModulation(width) for width in head_widths)

    def forward(self, maps: list[torch.Tensor], context: ForwardContext) -> list[torch.Tensor]:
        cache = context.get(CACHE_KEY)
        if cache is not None:
            cache = F.adaptive_avg_pool2d(cache, self.dim)
        if cache is not None or not self.reference:
            read = maps[0].new_zeros(1, self.dim, self.dim) if cache is None else cache
            maps = [head(attn, read) for head, attn in zip(self.heads, maps)]
        update = self.cache_update(maps)
        context[CACHE_KEY] = (
            CACHE_MOMENTUM * update if cache is None else CACHE_MOMENTUM * cache + (1 - CACHE_MOMENTUM) * update
        )
        return maps

    def cache_update(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """U = sum_i bilinear(A_i to C x C) * c_i / C: (B, C, C) per sample, else (1, C, C) batch mean.

        In reference mode each term is floor((bilinear(A_i) * c_i) / C), as the authors' `* c_i // dim`.
        """

        def resized(attn: torch.Tensor) -> torch.Tensor:
            attn = attn.detach()
            if not self.per_sample:
                attn = attn.mean(dim=0, keepdim=True)
            return F.interpolate(attn[:, None], size=(self.dim, self.dim), mode="bilinear", align_corners=False)[:, 0]

        if self.reference:
            return sum(resized(attn) * width // self.dim for attn, width in zip(maps, self.head_widths))
        return sum(resized(attn) * (width / self.dim) for attn, width in zip(maps, self.head_widths))


class HierarchicalMultiHeadAttention(nn.Module):
    """HMHA with optional QKCU. The head count is len(subspace_ratios); num_heads must match it."""

    uses_forward_context = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool,
        subspace_ratios: Sequence[int] = (1, 2, 2, 3),
        rerank: bool = True,
        rank_scope: str = "batch",
        compat: str = "corrected",
        intra: bool = True,
        inter: bool = True,
    ) -> None:
        super().__init__()
        self.head_widths = subspace_widths(dim, subspace_ratios)
        if num_heads != len(self.head_widths):
            raise ValueError(
                f"hmha: num_heads={num_heads} but subspace_ratios {list(subspace_ratios)} define "
                f"{len(self.head_widths)} heads; set the heads of the levels using hmha to {len(self.head_widths)}"
            )
        if rank_scope not in RANK_SCOPES:
            raise ValueError(f"hmha.rank_scope must be one of {', '.join(RANK_SCOPES)}, got {rank_scope!r}")
        if compat not in COMPAT_MODES:
            raise ValueError(f"hmha.compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}")
        if compat == "reference" and rank_scope != "batch":
            raise ValueError("hmha.compat: reference ranks and caches batch means as the authors do; set rank_scope: batch")
        self.rerank = rerank
        self.per_sample = rank_scope == "sample"
        self.reference = compat == "reference"
        # One learnable temperature per head, initialised to 1 (no 1/sqrt(d) scaling), as MDTA.
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = conv_projection(dim, dim * 3, bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)
        self.intra = IntraLayerModulation(dim) if intra else None
        self.inter = InterLayerModulation(self.head_widths, self.per_sample, self.reference) if inter else None

    def forward(self, x: torch.Tensor, context: ForwardContext | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        if self.rerank:
            index = channel_order(q, self.per_sample, self.reference)[..., None].expand(q.shape)
            q, k, v = (t.gather(1, index) for t in (q, k, v))
        q, k = l2_normalize(q), l2_normalize(k)
        maps = [
            (q_head @ k_head.transpose(-2, -1) * tau).softmax(dim=-1)
            for q_head, k_head, tau in zip(q.split(self.head_widths, 1), k.split(self.head_widths, 1), self.temperature)
        ]
        if self.inter is not None:
            maps = self.inter(maps, {} if context is None else context)
        out = torch.cat([attn @ v_head for attn, v_head in zip(maps, v.split(self.head_widths, 1))], dim=1)
        if self.intra is not None:
            out = self.intra(out, (q + k).detach())
        return self.project_out(out.reshape(batch, channels, height, width))
