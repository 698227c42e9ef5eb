"""The grouped expert kernel against the per-expert loop it replaced, in every regime.

Legend: T tokens, K experts per token, S slots, E experts, H hidden, I intermediate (INTER).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import experts.grouped_ffn as grouped_ffn
from experts.expert_slots import ExpertSlots, Layout, packing_supported
from experts.ffn import run_routed_experts, swiglu_mlp
from experts.grouped_ffn import grouped_mm_supported, routed_expert_sum, use_grouped_mm_for
from experts.weights import MLPWeights

H, INTER, E = 32, 16, 16
CPU = torch.device("cpu")
REGIMES = [True, False] if grouped_mm_supported(CPU, torch.float32, H, INTER) else [False]


def _slots(
    dtype: torch.dtype = torch.float32,
    order: list[int] | None = None,
    layout: Layout = "stacked",
) -> ExpertSlots:
    """Every expert in a slot; ``order`` says which expert goes into slot 0, 1, ..."""
    gen = torch.Generator().manual_seed(0)
    slots = ExpertSlots(E + 2, E, H, INTER, dtype, "cpu", layout)  # two slots stay free
    for e in order or range(E):
        w = MLPWeights(
            torch.randn(2 * INTER, H, generator=gen) * 0.3, torch.randn(H, INTER, generator=gen)
        )
        slots.add(e, MLPWeights(w.gate_up.to(dtype), w.down.to(dtype)))
    return slots


def _routing(tokens: int, k: int, seed: int, experts: int = E) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=gen)  # [T, H]
    logits = torch.randn(tokens, experts, generator=gen)  # [T, E]
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [T, K] each
    return hidden, ids, weights


def _loop(slots: ExpertSlots, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> Any:
    def expert(e: int) -> MLPWeights:
        (slot, *_) = slots.slots_of(e)
        if slots.layout == "packed":
            return slots.read_slot(slot)  # [2I, H], [H, I]
        return MLPWeights(slots.gate_up[slot].T, slots.down[slot].T)  # [2I, H], [H, I] views

    return run_routed_experts(hidden, ids, w, expert)


def _grouped(
    slots: ExpertSlots, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, use: bool
) -> torch.Tensor:
    return routed_expert_sum(hidden, slots.lookup(ids), w, slots.gate_up, slots.down, use)


@pytest.mark.parametrize("use_grouped_mm", REGIMES)
@pytest.mark.parametrize("tokens", [1, 16, 64, 200])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_matches_the_per_expert_loop(use_grouped_mm: bool, tokens: int, k: int) -> None:
    slots = _slots(order=list(range(E - 1, -1, -1)))  # slot ids are not expert ids
    hidden, ids, w = _routing(tokens, k, seed=tokens * 10 + k)
    got = _grouped(slots, hidden, ids, w, use_grouped_mm)
    expected = _loop(slots, hidden, ids, w)
    if k <= 2:  # same rows per expert, and a + b == b + a: bit for bit
        assert torch.equal(got, expected)
    else:  # the loop sums in expert order, the kernel in k order (as transformers does)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not packing_supported(CPU, torch.float32),
    reason="this CPU build of torch has no oneDNN weight prepacking for fp32",
)
@pytest.mark.parametrize("tokens", [1, 16, 64])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_packed_slots_match_the_per_expert_loop(tokens: int, k: int) -> None:
    """oneDNN's prepacked kernel sums in another order than MKL's: close, not bit-equal."""
    slots = _slots(order=list(range(E - 1, -1, -1)), layout="packed")
    hidden, ids, w = _routing(tokens, k, seed=tokens * 10 + k)
    got = slots.expert_sum(hidden, slots.lookup(ids), w)
    torch.testing.assert_close(got, _loop(slots, hidden, ids, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(slots.expert_sum(hidden[:0], slots.lookup(ids[:0]), w[:0]), hidden[:0])


@pytest.mark.parametrize("use_grouped_mm", REGIMES)
def test_empty_groups_and_free_slots(use_grouped_mm: bool) -> None:
    """Only three of sixteen experts are chosen; two slots hold no expert at all."""
    slots = _slots()
    hidden, ids, w = _routing(24, 2, seed=3, experts=3)
    ids = ids * 5  # experts 0, 5 and 10
    got = _grouped(slots, hidden, ids, w, use_grouped_mm)
    assert torch.equal(got, _loop(slots, hidden, ids, w))


@pytest.mark.parametrize("use_grouped_mm", REGIMES)
def test_padding_pairs_add_nothing(use_grouped_mm: bool) -> None:
    """Shards pad rows with expert -1 (weight 0): the kernel skips those pairs."""
    slots = _slots()
    hidden, ids, w = _routing(9, 3, seed=4)
    ids[0, 1] = ids[4, 0] = ids[4, 2] = -1
    ids[7] = -1  # a row of padding only
    w = w.masked_fill(ids < 0, 0.0)
    got = _grouped(slots, hidden, ids, w, use_grouped_mm)
    expected = torch.zeros_like(hidden)
    for t in range(9):
        for e, weight in zip(ids[t].tolist(), w[t].tolist(), strict=True):
            if e >= 0:
                (slot,) = slots.slots_of(e)
                mlp = MLPWeights(slots.gate_up[slot].T, slots.down[slot].T)
                expected[t] += weight * swiglu_mlp(hidden[t : t + 1], mlp)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[7], torch.zeros(H))


def test_unwritten_rows_of_the_grouped_matmul_never_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """On some devices grouped_mm leaves rows past the last group unwritten (any bits, NaN
    included): padding rows sort there, and must still add exactly nothing."""
    real = grouped_ffn.GROUPED_MM
    assert real is not None

    def garbage_tail(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = real(x, w, offs=offs)
        out[int(offs[-1]) :] = float("nan")
        return out

    monkeypatch.setattr(grouped_ffn, "GROUPED_MM", lambda x, w, offs: garbage_tail(x, w, offs))
    slots = _slots()
    hidden, ids, w = _routing(6, 2, seed=5)
    ids[2, 1] = -1
    w = w.masked_fill(ids < 0, 0.0)
    got = routed_expert_sum(hidden, slots.lookup(ids), w, slots.gate_up, slots.down, True)
    assert torch.isfinite(got).all()
    expected = routed_expert_sum(hidden, slots.lookup(ids), w, slots.gate_up, slots.down, False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("use_grouped_mm", REGIMES)
def test_empty_batches(use_grouped_mm: bool) -> None:
    slots = _slots()
    no_tokens = torch.zeros(0, 2, dtype=torch.long)
    out = routed_expert_sum(
        torch.zeros(0, H), no_tokens, no_tokens.float(), slots.gate_up, slots.down, use_grouped_mm
    )
    assert out.shape == (0, H)
    no_pairs = torch.zeros(3, 0, dtype=torch.long)
    out = routed_expert_sum(
        torch.ones(3, H), no_pairs, no_pairs.float(), slots.gate_up, slots.down, use_grouped_mm
    )
    assert torch.equal(out, torch.zeros(3, H))


def test_bfloat16_sums_in_fp32_and_stays_close_to_the_loop() -> None:
    slots = _slots(torch.bfloat16)
    hidden, ids, w = _routing(16, 2, seed=6)
    hidden = hidden.to(torch.bfloat16)
    got = _grouped(
        slots,
        hidden,
        ids,
        w,
        use=grouped_mm_supported(torch.device("cpu"), torch.bfloat16, H, INTER),
    )
    assert got.dtype == torch.bfloat16
    expected = _loop(slots, hidden, ids, w)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_grouped_mm_is_used_wherever_it_runs_but_batch_1_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = grouped_ffn.GROUPED_MM
    assert real is not None

    def counting(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, w, offs=offs)

    slots = _slots()
    runs = grouped_mm_supported(CPU, torch.float32, H, INTER, slots.in_out)  # probed before
    monkeypatch.setattr(grouped_ffn, "GROUPED_MM", counting)
    hidden, ids, w = _routing(4, 2, seed=7)
    routed_expert_sum(hidden, slots.lookup(ids), w, slots.gate_up, slots.down)
    assert calls == ([8, 8] if runs else [])  # one call per projection
    calls.clear()  # batch 1 (2 pairs, 18 slots) on CPU: slices, which skip the empty slots
    routed_expert_sum(hidden[:1], slots.lookup(ids[:1]), w[:1], slots.gate_up, slots.down)
    assert calls == []
    # where the probe finds no working grouped_mm (here: meta tensors), slices, never a crash
    assert not grouped_mm_supported(torch.device("meta"), torch.float32, H, INTER)
    # elsewhere (an accelerator where grouped_mm runs) batch 1 is grouped too: no host sync
    monkeypatch.setattr(grouped_ffn, "grouped_mm_supported", lambda *args: True)
    assert use_grouped_mm_for(torch.device("cuda"), torch.bfloat16, 2, 18, H, INTER)
    assert not use_grouped_mm_for(CPU, torch.bfloat16, 2, 18, H, INTER)
