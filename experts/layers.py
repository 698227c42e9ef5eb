"""Small tensor building blocks shared by every family: RMSNorm and rotary embeddings.

Legend: T tokens, H hidden, Hq query heads, D head dim.
"""

from __future__ import annotations

import torch

from experts.rope import RopeScaling

RotaryAngles = tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, D]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 like the reference implementations."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RotaryEmbedding:
    """Precomputed cos/sin tables for RoPE (plain, or YaRN-scaled), indexed by position.

    ``head_dim`` is the rotated width (the whole head, or its rotary part); YaRN blends the
    frequencies and scales cos and sin by its attention factor (``experts.rope``).

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
        scaling: RopeScaling | None = None,
    ):
        scaling = scaling or RopeScaling()
        self._inv_freq = scaling.inv_freq(head_dim, theta)  # [D/2]
        self._cos_sin_scale = scaling.cos_sin_scale
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
        cos, sin = emb.cos(), emb.sin()
        if self._cos_sin_scale != 1.0:  # YaRN's attention factor, in fp32 like the reference
            cos, sin = cos * self._cos_sin_scale, sin * self._cos_sin_scale
        self.cos = cos.to(self._device)
        self.sin = sin.to(self._device)
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
    """Rotate every head of x [T, heads, D] by its token's angles (q and k heads alike).

    Angles narrower than D (partial rotary, R = their width) rotate the first R dims of each
    head and pass the rest through, as GLM's reference does.
    """
    cos, sin = angles
    width = cos.shape[-1]
    if width != x.shape[-1]:  # partial rotary: [T, heads, R] rotated, [T, heads, D-R] kept
        return torch.cat((rotate(x[..., :width], angles), x[..., width:]), dim=-1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
