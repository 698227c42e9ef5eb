"""How one layer's expert slots are stored: the layout choice per device and dtype, oneDNN
prepacking, and ``SlotWeights`` (the projections one compute reads).

``stacked``: one tensor per projection with a leading slot axis, for ``grouped_mm``.
``packed``: one oneDNN-prepacked tensor per slot and projection (CPU, where oneDNN prepacks
the dtype). ``experts.expert_slots.ExpertSlots`` owns the slots and their table.

Legend: S slots, T tokens, K experts per token, H hidden, I intermediate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from experts.grouped_ffn import (
    ClampedSwiGLU,
    ExpertBiases,
    packed_expert_sum,
    packed_linear,
    routed_expert_sum,
)

Layout = Literal["stacked", "packed"]
PACK_ROWS_HINT = 16  # rows oneDNN prepacks for; measured the same from 8 to 32 rows

NO_SLOT = -1  # slot id of a pair to skip: a padding pair, or (on lookup) an expert not held


class MissingExpertError(LookupError):
    """A compute call needs an expert that is not held here (dropped or never loaded).

    A remote backend can catch it and re-plan with a newer routing table.
    """

    def __init__(self, message: str, expert: int = NO_SLOT) -> None:
        super().__init__(message)
        self.expert = expert


def stores_in_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether slot storage is [in, out] rows (``x @ W`` contiguous) rather than the
    checkpoint's [out, in] (``bench/expert_kernels.py``, top-2 of 16, H 512, I 1024).

    Only fp32 on CPU: there [in, out] measured 1.50x the old loop at batch 16 against 1.15x
    for [out, in]. bf16 on CPU runs [in, out] about 20x slower, and CUDA's grouped_mm fast
    path takes [out, in] through a transposed (column-major) view, as transformers uses it.
    """
    return device.type == "cpu" and dtype == torch.float32


@functools.lru_cache(maxsize=16)
def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks ``dtype`` weights for ``linear`` here, and agrees with ``mm``.

    CPU only; probed once, because support depends on the build and the CPU's instructions
    (bf16 needs AVX-512 or AVX-NE-CONVERT).
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen).to(dtype)  # [out, in]
    x = torch.randn(3, 16, generator=gen).to(dtype)  # [N, in]
    try:
        got = packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    expected = x.float() @ w.float().T  # [3, 24]
    return bool(torch.allclose(got.float(), expected, rtol=2e-2, atol=1e-2))


def choose_layout(device: str | torch.device, dtype: torch.dtype) -> Layout:
    """``packed`` where oneDNN prepacks the dtype (CPU), else ``stacked`` for grouped_mm."""
    return "packed" if packing_supported(torch.device(device), dtype) else "stacked"


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight prepacked for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


@dataclass(frozen=True)
class SlotWeights:
    """The projections of a layer's slots at one moment: what one compute reads.

    Taken under the owner's lock and used outside it; a later ``grow`` replaces the
    owner's tensors (or lists) but never these.
    """

    layout: Layout
    gate_up: torch.Tensor | tuple[torch.Tensor, ...]  # stacked [S, H, 2I] | S packed [2I, H]
    down: torch.Tensor | tuple[torch.Tensor, ...]  # stacked [S, I, H] | S packed [H, I]
    biases: ExpertBiases | None = None  # gpt-oss
    activation: ClampedSwiGLU | None = None  # gpt-oss; None: SwiGLU

    def expert_sum(
        self,
        hidden: torch.Tensor,  # [T, H]
        slot_ids: torch.Tensor,  # [T, K] long, NO_SLOT to skip a pair
        weights: torch.Tensor,  # [T, K] fp32
    ) -> torch.Tensor:  # [T, H]
        """Per token, the weighted sum of its chosen slots' outputs."""
        if isinstance(self.gate_up, tuple):
            assert isinstance(self.down, tuple)
            return packed_expert_sum(
                hidden, slot_ids, weights, self.gate_up, self.down, self.biases, self.activation
            )
        assert isinstance(self.down, torch.Tensor)
        return routed_expert_sum(
            hidden,
            slot_ids,
            weights,
            self.gate_up,
            self.down,
            biases=self.biases,
            activation=self.activation,
        )


def stack_slots(
    num_slots: int,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    device: str | torch.device,
    in_out: bool,
) -> torch.Tensor:  # [S, rows, cols] (a transposed view of [S, cols, rows] unless in_out)
    # zeros, not empty: a free slot is never read, but must never hold NaN if it were
    if in_out:
        return torch.zeros(num_slots, rows, cols, dtype=dtype, device=device)
    return torch.zeros(num_slots, cols, rows, dtype=dtype, device=device).transpose(1, 2)
