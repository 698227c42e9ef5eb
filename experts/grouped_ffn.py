"""Grouped routed-expert compute: one MoE layer's weighted expert sum, no Python loop over experts.

The (token, expert) pairs are sorted by slot, so each slot's tokens are one contiguous run
of rows; each projection is then one grouped matmul over the stacked slot tensors
(``ExpertSlots``) with the runs' end offsets, and the weighted rows are put back in pair
order and summed over K, in fp32 like the transformers reference.

``torch._grouped_mm`` (``F.grouped_mm`` when present) does the grouped matmul wherever it
runs for the device, dtype and sizes (probed once per combination: on CPU it does in this
build, for fp32 and bf16; on CUDA it depends on the GPU and dtype). Elsewhere the same
sorted runs are multiplied slice by slice (one host sync for the offsets), and so they are
on CPU for a batch-1-sized call (at most one pair per 8 slots): CPU grouped_mm runs one mm
per slot, empty ones too, and there the slices measured 0-13% faster (fp32 and bf16, top-2
of 16 and top-8 of 64), while grouped_mm leads from a quarter of the slots on. A batched
matmul over per-pair gathered weights is 2-25x slower than the old loop. Measured
alternatives, the storage layouts and the choice: ``bench/expert_kernels.py``.

On CPU, where oneDNN can prepack a weight for ``linear`` (fp32 on this machine's AVX2; bf16
needs AVX-512 or AVX-NE-CONVERT), each slot is one prepacked tensor instead
(``ExpertSlots`` layout ``packed``) and ``packed_expert_sum`` multiplies the same sorted
runs slot by slot through oneDNN: MKL's sgemm, which ``mm`` and CPU ``grouped_mm`` call, is
slow at a few rows on this AMD CPU, and oneDNN's prepacked kernel measured 1.2x at 2 rows,
2.1x at 4, 1.65x at 64 (one row: within 15%), and the bench preset's batch-16 engine step
1.4x faster (``bench/expert_kernels.py`` measures the kernels).

gpt-oss experts add a bias to each projection and clamp their SwiGLU (``ClampedSwiGLU``);
both are optional arguments, and without them every path runs exactly the ops it ran before.

Legend: T tokens, K experts chosen per token, P = T*K pairs, S slots, H hidden,
I intermediate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
CPU_SLICES_SLOTS_PER_PAIR = 8  # on CPU, slice by slice when S >= 8 P: most slots are empty


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: gate clamped from above and up on both sides at
    ``limit``, then ``(up + 1) * gate * sigmoid(alpha * gate)`` (transformers'
    ``GptOssExperts._apply_gate``, with gate and up already de-interleaved)."""

    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [N, I]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def glu(gate_up: torch.Tensor, activation: ClampedSwiGLU | None) -> torch.Tensor:
    """[N, 2I] gate and up projections -> [N, I]: SwiGLU, or the clamped variant."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    return F.silu(gate) * up if activation is None else activation(gate, up)


@dataclass(frozen=True)
class ExpertBiases:
    """Per-slot projection biases (gpt-oss experts): added after each matmul."""

    gate_up: torch.Tensor  # [S, 2I]
    down: torch.Tensor  # [S, H]


@functools.lru_cache(maxsize=64)
def grouped_mm_supported(
    device: torch.device, dtype: torch.dtype, hidden: int, inter: int, row_major: bool = True
) -> bool:
    """Whether the grouped matmul runs (and agrees with ``mm``) for these operands.

    Probed on a small problem of the real row widths and weight layout (``row_major``:
    [in, out] rows, else a transposed view of [out, in]), with an empty and an unaligned
    group, because support depends on the build, the device, the layout and alignment.
    """
    if GROUPED_MM is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, hidden, generator=gen).to(device, dtype)  # [3, H]
    w = torch.randn(3, 2 * inter, hidden, generator=gen).to(device, dtype)  # [3, 2I, H]
    w = w.transpose(1, 2).contiguous() if row_major else w.transpose(1, 2)  # [3, H, 2I]
    ends = torch.tensor([1, 1, 3], dtype=torch.int32, device=device)  # slot 1 empty, unaligned
    try:
        got = GROUPED_MM(x, w, offs=ends)  # [3, 2I]
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    expected = torch.cat([x[:1] @ w[0], x[1:] @ w[2]])  # [3, 2I]
    return bool(torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=1e-2))


def use_grouped_mm_for(
    device: torch.device,
    dtype: torch.dtype,
    num_pairs: int,
    num_slots: int,
    hidden: int,
    inter: int,
    row_major: bool = True,
) -> bool:
    """The kernel per regime: grouped_mm where it runs, except few pairs for many slots on CPU."""
    if device.type == "cpu" and num_pairs * CPU_SLICES_SLOTS_PER_PAIR <= num_slots:
        return False
    return grouped_mm_supported(device, dtype, hidden, inter, row_major)


def sort_by_slot(
    slot_ids: torch.Tensor,  # [T, K] long, -1 for a pair to skip
    num_slots: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [P], [P], [S] int32
    """(order, sorted slot per row, run ends): pairs sorted by slot, skipped pairs last.

    ``order[r]`` is the flat pair index (``token * K + k``) of sorted row ``r``; the stable
    sort keeps each slot's tokens in token order. ``ends[s]`` is where slot ``s``'s run ends.
    """
    flat = slot_ids.reshape(-1)  # [P]
    keys, order = torch.sort(flat.masked_fill(flat < 0, num_slots), stable=True)  # [P], [P]
    bounds = torch.arange(1, num_slots + 1, device=flat.device)  # [S]
    ends = torch.searchsorted(keys, bounds, out_int32=True)  # [S]
    return order, keys, ends


def grouped_linear(
    x: torch.Tensor,  # [P, in] rows sorted by slot
    weight: torch.Tensor,  # [S, in, out] (any strides)
    ends: torch.Tensor,  # [S] int32 run ends
    use_grouped_mm: bool,
) -> torch.Tensor:  # [P, out]; rows past ends[-1] are unspecified
    """Row run ``s`` of ``x`` times ``weight[s]``, for every slot at once."""
    if use_grouped_mm:
        assert GROUPED_MM is not None
        return GROUPED_MM(x, weight, offs=ends)  # [P, out]
    out = x.new_zeros(x.shape[0], weight.shape[2])  # [P, out]
    start = 0
    for slot, end in enumerate(ends.tolist()):  # the fallback: one sync, then slice by slice
        if end > start:
            torch.mm(x[start:end], weight[slot], out=out[start:end])  # [n, out]
        start = end
    return out


def routed_expert_sum(
    hidden: torch.Tensor,  # [T, H]
    slot_ids: torch.Tensor,  # [T, K] long: slot of each chosen expert, -1 to skip the pair
    weights: torch.Tensor,  # [T, K] fp32 gate weights
    gate_up: torch.Tensor,  # [S, H, 2I]
    down: torch.Tensor,  # [S, I, H]
    use_grouped_mm: bool | None = None,
    biases: ExpertBiases | None = None,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:  # [T, H]
    """Per token, the sum over its K pairs of weight * swiglu_slot(token); skipped pairs add 0.

    ``use_grouped_mm`` None: as ``use_grouped_mm_for`` chooses. ``biases`` and
    ``activation``: gpt-oss's biased projections and clamped SwiGLU.
    """
    num_tokens, num_k = slot_ids.shape
    num_slots, hidden_size, two_inter = gate_up.shape
    if num_tokens * num_k == 0:
        return torch.zeros_like(hidden)
    if use_grouped_mm is None:
        row_major = gate_up.stride(-1) == 1 and down.stride(-1) == 1
        use_grouped_mm = use_grouped_mm_for(
            gate_up.device,
            gate_up.dtype,
            num_tokens * num_k,
            num_slots,
            hidden_size,
            two_inter // 2,
            row_major,
        )
    order, keys, ends = sort_by_slot(slot_ids, num_slots)  # [P], [P], [S]
    x = hidden[order // num_k]  # [P, H] each pair's token, grouped by slot
    if biases is None and activation is None:  # the plain SwiGLU families' path, unchanged
        gate, up = grouped_linear(x, gate_up, ends, use_grouped_mm).chunk(2, dim=-1)  # [P, I]
        y = grouped_linear(F.silu(gate) * up, down, ends, use_grouped_mm)  # [P, H]
        return _weighted_pair_sum(y, hidden, order, keys, weights, num_slots)
    row_slot = keys.clamp(max=num_slots - 1)  # [P] (skipped pairs: any slot, zeroed later)
    projected = grouped_linear(x, gate_up, ends, use_grouped_mm)  # [P, 2I]
    if biases is not None:
        projected = projected + biases.gate_up[row_slot]
    y = grouped_linear(glu(projected, activation), down, ends, use_grouped_mm)  # [P, H]
    if biases is not None:
        y = y + biases.down[row_slot]
    return _weighted_pair_sum(y, hidden, order, keys, weights, num_slots)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` [N, in] times one oneDNN-prepacked weight (logical [out, in]), plus ``bias``
    [out] if given -> [N, out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_expert_sum(
    hidden: torch.Tensor,  # [T, H]
    slot_ids: torch.Tensor,  # [T, K] long: slot of each chosen expert, -1 to skip the pair
    weights: torch.Tensor,  # [T, K] fp32 gate weights
    gate_up: Sequence[torch.Tensor],  # S prepacked [2I, H]
    down: Sequence[torch.Tensor],  # S prepacked [H, I]
    biases: ExpertBiases | None = None,
    activation: ClampedSwiGLU | None = None,
) -> torch.Tensor:  # [T, H]
    """``routed_expert_sum`` over oneDNN-prepacked slots: the same sorted runs, one run at a
    time (one host sync for the run ends; prepacking is CPU-only)."""
    num_tokens, num_k = slot_ids.shape
    num_slots = len(gate_up)
    if num_tokens * num_k == 0:
        return torch.zeros_like(hidden)
    order, keys, ends = sort_by_slot(slot_ids, num_slots)  # [P], [P], [S]
    x = hidden[order // num_k]  # [P, H] each pair's token, grouped by slot
    y = torch.zeros_like(x)  # [P, H]: skipped pairs' rows stay 0
    start = 0
    plain = biases is None and activation is None
    for slot, end in enumerate(ends.tolist()):
        if end > start and plain:
            gate, up = packed_linear(x[start:end], gate_up[slot]).chunk(2, dim=-1)  # [n, I]
            y[start:end] = packed_linear(F.silu(gate) * up, down[slot])  # [n, H]
        elif end > start:
            up_bias, down_bias = (
                (None, None) if biases is None else (biases.gate_up[slot], biases.down[slot])
            )
            projected = packed_linear(x[start:end], gate_up[slot], up_bias)  # [n, 2I]
            y[start:end] = packed_linear(glu(projected, activation), down[slot], down_bias)
        start = end
    return _weighted_pair_sum(y, hidden, order, keys, weights, num_slots)


def _weighted_pair_sum(
    y: torch.Tensor,  # [P, H] each sorted pair's expert output; rows of skipped pairs: any
    hidden: torch.Tensor,  # [T, H]
    order: torch.Tensor,  # [P] flat pair index of each sorted row
    keys: torch.Tensor,  # [P] sorted slot per row (num_slots: a skipped pair)
    weights: torch.Tensor,  # [T, K] fp32 gate weights
    num_slots: int,
) -> torch.Tensor:  # [T, H]
    """Weight each pair's output, put the rows back in pair order and sum over K in fp32."""
    num_tokens, num_k = weights.shape
    y = y * weights.reshape(-1)[order, None]  # [P, H] fp32, like the reference
    # skipped pairs' rows were never computed (may hold anything on some devices): exact 0
    y = torch.where((keys < num_slots)[:, None], y, 0.0)  # [P, H]
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # [P, H] back in pair order
    return pairs.view(num_tokens, num_k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]
