"""Reformer-style channel attention: shared QK, LSH buckets, chunked attention (a GLMHA-paper baseline).

- Shared QK: one projection gives the queries, and the keys are the same L2-normalised vectors
  (Reformer's shared-QK attention), so the projection is C -> 2C instead of C -> 3C.
- LSH: each channel token (its H*W features) is hashed by a random rotation R (HW x buckets/2):
  bucket = argmax([xR, -xR]). R depends on H*W, so it is drawn from a fixed seed for every H*W.
- Tokens are sorted by (bucket, position), cut into chunks of `chunk_size`, and each chunk attends
  to itself and the chunk before it (wrapping around), as in Reformer. A token attends to itself
  only when nothing else is in reach (its own score is pushed to -1e4, Reformer's rule for shared
  QK). Outputs are put back in the original channel order before the 1x1 projection.
At C/h = 48 channel tokens per head there is little to save: the GLMHA paper's point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attention.base import ChannelAttention, conv_projection, l2_normalize, seeded_normal

SELF_SCORE = -1e4


class ReformerAttention(ChannelAttention):
    def __init__(
        self, dim: int, num_heads: int, bias: bool, num_buckets: int = 4, chunk_size: int = 12, seed: int = 0
    ) -> None:
        super().__init__(dim, num_heads, bias)
        if num_buckets < 2 or num_buckets % 2:
            raise ValueError(f"reformer.num_buckets must be an even number >= 2, got {num_buckets}")
        if chunk_size < 1:
            raise ValueError(f"reformer.chunk_size must be >= 1, got {chunk_size}")
        self.num_buckets = num_buckets
        self.chunk_size = chunk_size
        self.seed = seed
        self.qkv = conv_projection(dim, dim * 2, bias)

    def bucket_order(self, qk: torch.Tensor) -> torch.Tensor:
        """Permutation (B, h, d) that sorts the channel tokens by LSH bucket, then by position."""
        rotation = seeded_normal((qk.shape[-1], self.num_buckets // 2), self.seed, like=qk)
        rotated = qk @ rotation
        buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
        positions = torch.arange(qk.shape[-2], device=qk.device)
        return torch.argsort(buckets * qk.shape[-2] + positions, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        qk, v = (self.split_heads(t) for t in self.qkv(x).chunk(2, dim=1))
        qk = l2_normalize(qk)
        b, heads, d, n = qk.shape
        order = self.bucket_order(qk)
        gather_index = order[..., None].expand(-1, -1, -1, n)
        qk_sorted, v_sorted = qk.gather(2, gather_index), v.gather(2, gather_index)

        # Pad the token axis to whole chunks; padded keys are masked out below.
        chunk = min(self.chunk_size, d)
        pad = (-d) % chunk
        num_chunks = (d + pad) // chunk
        qk_sorted = F.pad(qk_sorted, (0, 0, 0, pad))
        v_sorted = F.pad(v_sorted, (0, 0, 0, pad))
        positions = F.pad(order, (0, pad), value=-1)  # original channel index; -1 marks padding

        def chunked(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, heads, num_chunks, chunk, *t.shape[3:])

        def with_previous(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.roll(1, dims=2)], dim=3) if num_chunks > 1 else t

        queries, keys, values = chunked(qk_sorted), with_previous(chunked(qk_sorted)), with_previous(chunked(v_sorted))
        query_pos, key_pos = chunked(positions), with_previous(chunked(positions))

        scores = (queries @ keys.transpose(-2, -1)) * self.temperature[:, :, :, None]
        is_self = query_pos[..., :, None] == key_pos[..., None, :]
        scores = scores.masked_fill(is_self, SELF_SCORE)
        scores = scores.masked_fill((key_pos < 0)[..., None, :], float("-inf"))
        out = (scores.softmax(dim=-1) @ values).reshape(b, heads, num_chunks * chunk, n)[:, :, :d]

        # Undo the sort: scatter each row back to its original channel position.
        restored = torch.empty_like(out).scatter_(2, gather_index, out)
        return self.project_out(self.merge_heads(restored, height, width))
