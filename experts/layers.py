"""Small tensor building blocks shared by every family: RMSNorm and rotary embeddings.

Legend: T tokens, H hidden, Hq query heads, D head dim.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 like the reference implementations."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RotaryEmbedding:
    """Precomputed cos/sin tables for the default (unscaled) RoPE, indexed by position."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        self._inv_freq = 1.0 / (theta**exponent)  # [D/2]
        self._device = device
        self.max_positions = 0
        self.cos = self.sin = torch.empty(0)
        self.ensure(max_positions)

    def ensure(self, max_positions: int) -> None:
        """Grow the tables to cover ``max_positions`` (windowed sequences can run past them)."""
        if max_positions <= self.max_positions:
            return
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, self._inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(self._device)
        self.sin = emb.sin().to(self._device)
        self.max_positions = max_positions

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their token positions [T]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
