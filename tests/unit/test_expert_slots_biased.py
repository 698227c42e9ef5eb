"""gpt-oss experts in slots: projection biases and the clamped SwiGLU, in every layout and
kernel, against a plain per-pair loop; biases survive rewrites, growth and reads.

Legend: S slots, E experts, T tokens, K experts per token, H hidden, I intermediate (INTER).
"""

from __future__ import annotations

import pytest
import torch

from experts.expert_slots import ExpertSlots, Layout, packing_supported
from experts.grouped_ffn import ClampedSwiGLU, glu, routed_expert_sum
from experts.weights import MLPWeights

H, INTER, E = 8, 4, 6
CPU = torch.device("cpu")
ACT = ClampedSwiGLU(alpha=1.702, limit=0.8)  # tight: the clamps bite on these weights
LAYOUTS: list[Layout] = (
    ["stacked", "packed"] if packing_supported(CPU, torch.float32) else ["stacked"]
)


def _weights(seed: int) -> MLPWeights:
    gen = torch.Generator().manual_seed(seed)
    return MLPWeights(
        torch.randn(2 * INTER, H, generator=gen),  # [2I, H]
        torch.randn(H, INTER, generator=gen),  # [H, I]
        torch.randn(2 * INTER, generator=gen),  # [2I]
        torch.randn(H, generator=gen),  # [H]
    )


def _slots(layout: Layout, num_slots: int = E) -> ExpertSlots:
    slots = ExpertSlots(num_slots, E, H, INTER, torch.float32, "cpu", layout, True, ACT)
    for e in range(E):
        slots.add(e, _weights(e))
    return slots


def _loop(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per token and pair: (glu(x gate_up^T + b) down^T + b') * weight, as transformers does."""
    out = torch.zeros_like(hidden)  # [T, H]
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            if ids[t, k] < 0:
                continue
            w = _weights(int(ids[t, k]))
            assert w.gate_up_bias is not None and w.down_bias is not None
            gate_up = hidden[t] @ w.gate_up.T + w.gate_up_bias  # [2I]
            out[t] += (glu(gate_up[None], ACT)[0] @ w.down.T + w.down_bias) * weights[t, k]
    return out


def _routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, H, generator=gen)  # [T, H]
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(num_tokens)])
    ids[0, 1] = -1  # a padding pair adds nothing, bias included
    return hidden, ids, torch.rand(num_tokens, 2, generator=gen)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_biased_clamped_experts_match_the_loop(layout: Layout, num_tokens: int) -> None:
    slots = _slots(layout)
    hidden, ids, weights = _routing(num_tokens, seed=num_tokens)
    expected = _loop(hidden, ids, weights)
    got = slots.expert_sum(hidden, slots.lookup(ids), weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_both_stacked_kernels_add_the_biases(use_grouped_mm: bool) -> None:
    slots = _slots("stacked")
    snap = slots.snapshot()
    assert isinstance(snap.gate_up, torch.Tensor) and isinstance(snap.down, torch.Tensor)
    hidden, ids, weights = _routing(9, seed=3)
    got = routed_expert_sum(
        hidden,
        slots.lookup(ids),
        weights,
        snap.gate_up,
        snap.down,
        use_grouped_mm,
        snap.biases,
        snap.activation,
    )
    torch.testing.assert_close(got, _loop(hidden, ids, weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_biases_follow_their_expert_through_growth_and_reads(layout: Layout) -> None:
    slots = _slots(layout, num_slots=2)  # grows twice on the way to 6 experts
    assert slots.num_slots >= E
    for e in range(E):
        read, written = slots.read_slot(slots.slots_of(e)[0]), _weights(e)
        assert read.gate_up_bias is not None and written.gate_up_bias is not None
        assert read.down_bias is not None and written.down_bias is not None
        assert torch.equal(read.gate_up_bias, written.gate_up_bias)
        assert torch.equal(read.down_bias, written.down_bias)
    hidden, ids, weights = _routing(7, seed=4)
    torch.testing.assert_close(
        slots.expert_sum(hidden, slots.lookup(ids), weights),
        _loop(hidden, ids, weights),
        atol=1e-5,
        rtol=1e-5,
    )


def test_slots_refuse_weights_without_the_biases_they_hold() -> None:
    slots = ExpertSlots(2, E, H, INTER, torch.float32, "cpu", "stacked", True, ACT)
    unbiased = _weights(0)
    with pytest.raises(AssertionError, match="expert biases given: False"):
        slots.add(0, MLPWeights(unbiased.gate_up, unbiased.down))
