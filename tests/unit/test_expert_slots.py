"""ExpertSlots: stacked storage written in place, the slot table, lookups and their errors.

Legend: S slots, E experts, T tokens, K experts per token, H hidden, I intermediate (INTER).
"""

from __future__ import annotations

import pytest
import torch

from experts.expert_slots import (
    NO_SLOT,
    ExpertSlots,
    Layout,
    MissingExpertError,
    choose_layout,
    packing_supported,
)
from experts.weights import MLPWeights

H, INTER, E = 8, 4, 6
CPU = torch.device("cpu")
# (dtype, layout) pairs this machine can hold; packed needs oneDNN's prepacking for the dtype
LAYOUTS = [(torch.float32, "stacked"), (torch.bfloat16, "stacked")] + [
    (dtype, "packed") for dtype in (torch.float32, torch.bfloat16) if packing_supported(CPU, dtype)
]


def _weights(seed: int, dtype: torch.dtype = torch.float32) -> MLPWeights:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(2 * INTER, H, generator=gen).to(dtype)  # [2I, H]
    return MLPWeights(gate_up, torch.randn(H, INTER, generator=gen).to(dtype))


def _slots(
    num_slots: int = 4, dtype: torch.dtype = torch.float32, layout: Layout | None = None
) -> ExpertSlots:
    return ExpertSlots(num_slots, E, H, INTER, dtype, "cpu", layout)


def test_the_layout_follows_what_the_device_can_prepack() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        expected = "packed" if packing_supported(CPU, dtype) else "stacked"
        assert choose_layout("cpu", dtype) == expected == _slots(dtype=dtype).layout
    assert not packing_supported(torch.device("meta"), torch.float32)  # CPU only


@pytest.mark.parametrize(("dtype", "layout"), LAYOUTS)
def test_writes_go_into_the_preallocated_storage(dtype: torch.dtype, layout: Layout) -> None:
    slots = _slots(dtype=dtype, layout=layout)
    if layout == "stacked":
        # fp32 on CPU stores [in, out] rows, bf16 the checkpoint's [out, in]: both seen as x @ W
        assert slots.in_out == (dtype == torch.float32)
        assert slots.gate_up.is_contiguous() == slots.in_out
        assert slots.gate_up.shape == (4, H, 2 * INTER) and slots.down.shape == (4, INTER, H)
    storage = slots.storage_ids()
    for e in (3, 1, 5):
        slots.add(e, _weights(e, dtype))
    slots.write_slot(slots.slots_of(1)[0], _weights(10, dtype))  # rewrite in place
    assert slots.storage_ids() == storage
    assert [slots.slots_of(e) for e in (3, 1, 5)] == [(0,), (1,), (2,)]
    assert torch.equal(slots.read_slot(1).gate_up, _weights(10, dtype).gate_up)
    assert torch.equal(slots.read_slot(2).down, _weights(5, dtype).down)
    assert torch.equal(slots.read_slot(3).gate_up, torch.zeros(2 * INTER, H, dtype=dtype))
    assert slots.experts == [1, 3, 5] and slots.num_free == 1
    if layout == "stacked":
        assert torch.equal(slots.gate_up[1], _weights(10, dtype).gate_up.T)  # as x @ W takes it


@pytest.mark.parametrize(("dtype", "layout"), LAYOUTS)
def test_growing_keeps_every_slot_and_the_packed_ones_in_place(
    dtype: torch.dtype, layout: Layout
) -> None:
    slots = _slots(2, dtype=dtype, layout=layout)
    slots.add(0, _weights(0, dtype))
    slots.add(4, _weights(4, dtype))
    before = slots.storage_ids()
    slots.add(2, _weights(2, dtype))  # no free slot: grows to 4
    assert slots.num_slots == 4 and slots.num_free == 1
    for e in (0, 4, 2):
        assert torch.equal(slots.read_slot(slots.slots_of(e)[0]).down, _weights(e, dtype).down)
    if layout == "packed":  # the old slots' tensors are the same objects
        ids = slots.storage_ids()
        assert ids[:2] == before[:2] and ids[4:6] == before[2:]


def test_a_removed_experts_slot_is_reused_after_release() -> None:
    slots = _slots(2)
    storage = slots.storage_ids()
    slots.add(0, _weights(0))
    slots.add(4, _weights(4))
    freed = slots.remove(0)
    assert freed == [0] and not slots.has(0) and slots.num_free == 0
    slots.release(freed)
    assert slots.add(2, _weights(2)) == 0
    assert slots.storage_ids() == storage
    assert torch.equal(slots.read_slot(0).gate_up, _weights(2).gate_up)
    with pytest.raises(MissingExpertError, match="expert 0 is not held"):
        slots.remove(0)


def test_lookup_maps_experts_to_slots_and_padding_to_no_slot() -> None:
    slots = _slots()
    slots.add(5, _weights(5))
    slots.add(2, _weights(2))
    ids = torch.tensor([[2, 5], [5, -1], [-1, -1]])  # [T, K]
    assert slots.lookup(ids).tolist() == [[1, 0], [0, NO_SLOT], [NO_SLOT, NO_SLOT]]


def test_a_missing_expert_is_named_lowest_first() -> None:
    slots = _slots()
    slots.add(1, _weights(1))
    with pytest.raises(MissingExpertError, match=r"expert 3 is not held \(held: \[1\]\)") as err:
        slots.lookup(torch.tensor([[1, 4], [3, -1]]))
    assert err.value.expert == 3


def test_a_complete_table_and_a_move_between_slots() -> None:
    slots = _slots(E + 1)
    for e in range(E):
        slots.add(e, _weights(e))
    assert slots.is_complete
    ids = torch.arange(E)[:, None]  # [E, 1]
    assert slots.lookup(ids)[:, 0].tolist() == list(range(E))
    # move expert 2 to a new slot: write it, serve it from both, then drop the old one
    new = slots.take_free_slot()
    slots.write_slot(new, _weights(2))
    slots.assign(2, new)
    assert slots.slots_of(2) == (2, new) and slots.lookup(torch.tensor([[2]])).item() == 2
    slots.unassign(2, 2)
    assert slots.lookup(torch.tensor([[2]])).item() == new
    with pytest.raises(AssertionError, match="still serve"):
        slots.release([new])
    slots.release([2])
    assert slots.num_free == 1


@pytest.mark.parametrize(("dtype", "layout"), LAYOUTS)
def test_grow_keeps_the_held_experts_and_adds_free_slots(
    dtype: torch.dtype, layout: Layout
) -> None:
    slots = _slots(1, dtype, layout)
    slots.add(0, _weights(0, dtype))
    slots.add(1, _weights(1, dtype))  # no free slot: doubles
    assert slots.num_slots == 2 and slots.num_free == 0
    if layout == "stacked":
        assert slots.gate_up.is_contiguous() == slots.in_out  # the same storage layout
    assert torch.equal(slots.read_slot(0).gate_up, _weights(0, dtype).gate_up)
    assert torch.equal(slots.read_slot(1).down, _weights(1, dtype).down)


def test_a_weight_of_the_wrong_shape_is_refused() -> None:
    slots = _slots()
    bad = MLPWeights(torch.zeros(2 * INTER, H + 1), torch.zeros(H, INTER))
    with pytest.raises(AssertionError, match="does not fit"):
        slots.write_slot(0, bad)
