"""Small tensor building blocks shared by every family: RMSNorm and rotary embeddings.

Legend: T tokens, H hidden, Hq query heads, D head dim.
"""

from __future__ import annotations

import torch

RotaryAngles = tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, D]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 like the reference implementations."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RotaryEmbedding:
    """Precomputed cos/sin tables for the default (unscaled) RoPE, indexed by position.

    The tables start at ``max_positions`` (the trained context) and double when a
    windowed sequence runs past them, up to ``limit``: a few rebuilds over the model's
    life, never one per step. Admission refuses positions past ``limit``.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        max_positions: int,
        device: torch.device,
        limit: int | None = None,
    ):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        self._inv_freq = 1.0 / (theta**exponent)  # [D/2]
        self._device = device
        self.limit = max(max_positions, limit or 0)
        self.max_positions = 0
        self.num_builds = 0
        self.cos = self.sin = torch.empty(0)
        self._build(max_positions)

    def ensure(self, num_positions: int) -> None:
        """Cover positions [0, ``num_positions``): double the tables until they do."""
        if num_positions <= self.max_positions:
            return
        assert num_positions <= self.limit, (
            f"position {num_positions - 1} is past the rotary limit of {self.limit} "
            "positions: admission should have refused it"
        )
        size = max(self.max_positions, 1)
        while size < num_positions:
            size *= 2
        self._build(min(size, self.limit))

    def _build(self, num_positions: int) -> None:
        positions = torch.arange(num_positions, dtype=torch.float32)
        freqs = torch.outer(positions, self._inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(self._device)
        self.sin = emb.sin().to(self._device)
        self.max_positions = num_positions
        self.num_builds += 1

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """cos and sin [T, 1, D] at ``positions`` [T]: gathered once a forward, for every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        return cos, sin

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their token positions [T]."""
        angles = self.at(positions, q.dtype)
        return rotate(q, angles), rotate(k, angles)


def rotate(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate every head of x [T, heads, D] by its token's angles (q and k heads alike)."""
    cos, sin = angles
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
