"""One MoE layer's routed experts, stacked in fixed slots on one device.

Every projection is one preallocated tensor with a leading slot axis, so the grouped
kernel (``experts.grouped_ffn``) reads all of a layer's experts from two tensors, and
an expert is moved by writing its weights into a free slot in place (``copy_``): no
reallocation, and computes that hold the tensors keep running. A slot table maps each
held expert to its slot(s); an expert may sit in more than one slot while it moves
(the new slot is written, then the old one released), and computes use its first.

Two storage layouts, chosen per device and dtype (``choose_layout``):
- ``stacked``: ``gate_up`` [S, H, 2I] and ``down`` [S, I, H], for ``grouped_mm`` (CUDA, and
  CPU dtypes oneDNN cannot prepack here);
- ``packed`` (CPU, where oneDNN prepacks the dtype): one oneDNN-prepacked tensor per slot and
  projection, in a fixed list. oneDNN's blocked layout is opaque per tensor, so the slots
  cannot share one stacked tensor; a slot is still rewritten in place (a prepacked copy into
  the slot's own tensor), and growing appends slots without touching the others.

gpt-oss experts also carry a bias per projection, kept as [S, 2I] and [S, H] tensors in
either layout, and compute the clamped SwiGLU (``ExpertSlots.for_spec`` sets both up).

Legend: S slots, E experts of the layer, T tokens, K experts per token, H hidden,
I intermediate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from experts.checkpoint import CheckpointReader
from experts.grouped_ffn import ClampedSwiGLU, ExpertBiases
from experts.slot_layout import (
    NO_SLOT,
    Layout,
    MissingExpertError,
    SlotWeights,
    choose_layout,
    pack,
    packing_supported,
    stack_slots,
    stores_in_out,
)
from experts.spec import ModelSpec
from experts.weights import MLPWeights, load_expert

__all__ = [
    "NO_SLOT",
    "ExpertSlots",
    "Layout",
    "MissingExpertError",
    "SlotWeights",
    "choose_layout",
    "load_expert_slots",
    "packing_supported",
    "stores_in_out",
]


class ExpertSlots:
    """S fixed slots of one layer's experts, in one of two layouts (see the module).

    ``stacked``: ``gate_up`` [S, H, 2I] and ``down`` [S, I, H], both seen as the matmul's
    right operand (``x @ W``), what ``grouped_mm`` takes; the storage under them is either
    that ([in, out] rows) or the checkpoint's [out, in] read through a transposed view,
    whichever ``stores_in_out`` says is faster for the device and dtype. ``packed``:
    ``packed_gate_up`` and ``packed_down``, one oneDNN-prepacked tensor per slot.

    Not thread-safe by itself: the owner serialises changes (``ExpertShard`` holds a
    lock) and decides when a released slot may be written again.
    """

    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        device: str | torch.device,
        layout: Layout | None = None,
        biased: bool = False,
        activation: ClampedSwiGLU | None = None,
    ) -> None:
        assert num_slots > 0 and num_experts > 0, (num_slots, num_experts)
        self.activation = activation
        # [S, 2I] and [S, H] projection biases (gpt-oss); zeros, like free slots
        self.biases: ExpertBiases | None = None
        if biased:
            self.biases = ExpertBiases(
                torch.zeros(num_slots, 2 * inter, dtype=dtype, device=device),
                torch.zeros(num_slots, hidden, dtype=dtype, device=device),
            )
        self.num_experts = num_experts
        self.layout: Layout = layout or choose_layout(device, dtype)
        self._shape = (hidden, inter)
        self._dtype, self._device = dtype, torch.device(device)
        self.in_out = stores_in_out(self._device, dtype)
        self.packed_gate_up: list[torch.Tensor] = []  # packed: [2I, H] per slot
        self.packed_down: list[torch.Tensor] = []  # packed: [H, I] per slot
        if self.layout == "packed":
            assert packing_supported(self._device, dtype), f"oneDNN cannot prepack {dtype} here"
            self.gate_up = self.down = torch.empty(0)  # not used in this layout
            self._append_packed(num_slots)
        else:
            self.gate_up = stack_slots(num_slots, hidden, 2 * inter, dtype, device, self.in_out)
            self.down = stack_slots(num_slots, inter, hidden, dtype, device, self.in_out)
        self._num_slots = num_slots
        self._slots_of: dict[int, list[int]] = {}  # expert -> its slots, first one serves
        self._free: list[int] = list(range(num_slots))
        self._slot_map = torch.full((num_experts,), NO_SLOT, dtype=torch.long, device=device)  # [E]

    @classmethod
    def for_spec(
        cls,
        spec: ModelSpec,
        num_slots: int,
        dtype: torch.dtype,
        device: str | torch.device,
        layout: Layout | None = None,
    ) -> ExpertSlots:
        """Slots for one MoE layer of ``spec``'s model: biased, clamped experts for gpt-oss."""
        activation = None
        if spec.swiglu_limit:
            activation = ClampedSwiGLU(spec.swiglu_alpha, spec.swiglu_limit)
        return cls(
            num_slots,
            spec.num_experts,
            spec.hidden_size,
            spec.moe_intermediate_size,
            dtype,
            device,
            layout,
            biased=spec.family.fused_experts,
            activation=activation,
        )

    def _append_packed(self, count: int) -> None:
        """``count`` more packed slots, zero (a free slot is never read, but is never NaN)."""
        hidden, inter = self._shape
        zero_gate_up = pack(torch.zeros(2 * inter, hidden, dtype=self._dtype))  # [2I, H]
        zero_down = pack(torch.zeros(hidden, inter, dtype=self._dtype))  # [H, I]
        for _ in range(count):
            self.packed_gate_up.append(zero_gate_up.clone())
            self.packed_down.append(zero_down.clone())

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def snapshot(self) -> SlotWeights:
        """The slots' projections as one compute reads them (see ``SlotWeights``)."""
        if self.layout == "packed":
            return SlotWeights(
                "packed",
                tuple(self.packed_gate_up),
                tuple(self.packed_down),
                self.biases,
                self.activation,
            )
        return SlotWeights("stacked", self.gate_up, self.down, self.biases, self.activation)

    def expert_sum(
        self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:  # [T, H]
        """Per token [T, H], the weighted sum of its chosen slots ([T, K]) outputs."""
        return self.snapshot().expert_sum(hidden, slot_ids, weights)

    def storage_ids(self) -> tuple[int, ...]:
        """What identifies the storage the slots live in: equal while nothing is reallocated
        (a rewrite in place keeps it; ``grow`` changes it in the stacked layout)."""
        if self.layout == "packed":
            return tuple(id(t) for t in (*self.packed_gate_up, *self.packed_down))
        return (self.gate_up.data_ptr(), self.down.data_ptr())

    def read_slot(self, slot: int) -> MLPWeights:
        """A copy of ``slot``'s weights in the checkpoint layout ([2I, H] and [H, I])."""
        if self.layout == "packed":
            gate_up = self.packed_gate_up[slot].to_dense()  # [2I, H]
            down = self.packed_down[slot].to_dense()  # [H, I]
        else:
            gate_up = self.gate_up[slot].T.contiguous()
            down = self.down[slot].T.contiguous()
        if self.biases is None:
            return MLPWeights(gate_up=gate_up, down=down)
        return MLPWeights(
            gate_up, down, self.biases.gate_up[slot].clone(), self.biases.down[slot].clone()
        )

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def experts(self) -> list[int]:
        return sorted(self._slots_of)

    @property
    def is_complete(self) -> bool:
        """Every expert of the layer is held: a lookup can never miss."""
        return len(self._slots_of) == self.num_experts

    def has(self, expert: int) -> bool:
        return expert in self._slots_of

    def slots_of(self, expert: int) -> tuple[int, ...]:
        return tuple(self._slots_of.get(expert, ()))

    def write_slot(self, slot: int, weights: MLPWeights) -> None:
        """Copy ``weights`` (checkpoint layout) into ``slot`` in place (same storage)."""
        assert 0 <= slot < self.num_slots, f"slot {slot} out of range [0, {self.num_slots})"
        hidden, inter = self._shape
        assert tuple(weights.gate_up.shape) == (2 * inter, hidden), (
            f"gate_up {tuple(weights.gate_up.shape)} does not fit [2I, H] = {(2 * inter, hidden)}"
        )
        assert tuple(weights.down.shape) == (hidden, inter), (
            f"down {tuple(weights.down.shape)} does not fit [H, I] = {(hidden, inter)}"
        )
        has_bias = weights.gate_up_bias is not None and weights.down_bias is not None
        assert has_bias == (self.biases is not None), (
            f"expert biases given: {has_bias}, slots hold biases: {self.biases is not None}"
        )
        if self.biases is not None:
            assert weights.gate_up_bias is not None and weights.down_bias is not None
            self.biases.gate_up[slot].copy_(weights.gate_up_bias)  # [2I]
            self.biases.down[slot].copy_(weights.down_bias)  # [H]
        if self.layout == "packed":  # prepacked aside, then copied into the slot's tensor
            self.packed_gate_up[slot].copy_(pack(weights.gate_up.to(self._dtype)))
            self.packed_down[slot].copy_(pack(weights.down.to(self._dtype)))
            return
        self.gate_up[slot].copy_(weights.gate_up.T)  # [H, 2I] from [2I, H]
        self.down[slot].copy_(weights.down.T)  # [I, H] from [H, I]

    def take_free_slot(self) -> int:
        """The lowest free slot, now reserved (write it, then ``assign`` it)."""
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} slots are in use; grow() first")
        self._free.sort()
        return self._free.pop(0)

    def assign(self, expert: int, slot: int) -> None:
        """Serve ``expert`` from ``slot`` too (after its first slot, if it has one)."""
        assert 0 <= expert < self.num_experts, (
            f"expert {expert} out of range [0, {self.num_experts})"
        )
        assert slot not in self._free, f"slot {slot} is free: take it and write it first"
        slots = self._slots_of.setdefault(expert, [])
        assert slot not in slots, f"expert {expert} already has slot {slot}"
        slots.append(slot)
        self._slot_map[expert] = slots[0]

    def unassign(self, expert: int, slot: int) -> None:
        """Stop serving ``expert`` from ``slot`` (one of several: the end of a move); the
        caller ``release``s the slot when no running compute can still read it."""
        slots = self._slots_of.get(expert, [])
        assert slot in slots and len(slots) > 1, (
            f"slot {slot} is not one of expert {expert}'s several slots {slots}: use remove()"
        )
        slots.remove(slot)
        self._slot_map[expert] = slots[0]

    def add(self, expert: int, weights: MLPWeights) -> int:
        """Write ``expert`` into a free slot (growing the tensors when none is) and serve it."""
        if not self._free:
            self.grow(2 * self.num_slots)
        slot = self.take_free_slot()
        self.write_slot(slot, weights)
        self.assign(expert, slot)
        return slot

    def remove(self, expert: int) -> list[int]:
        """Stop serving ``expert``; returns its slots, which the caller ``release``s when no
        running compute can still read them."""
        slots = self._slots_of.pop(expert, None)
        if slots is None:
            raise MissingExpertError(
                f"expert {expert} is not held (held: {self.experts})", expert=expert
            )
        self._slot_map[expert] = NO_SLOT
        return slots

    def release(self, slots: list[int]) -> None:
        """Make ``slots`` free for new writes."""
        used = {s for ss in self._slots_of.values() for s in ss}
        assert not used & set(slots), f"slots {sorted(used & set(slots))} still serve experts"
        self._free.extend(s for s in slots if s not in self._free)

    def grow(self, num_slots: int) -> None:
        """Reallocate to ``num_slots`` (the rare path: size the slots up front to avoid it).

        Computes that already hold the old tensors finish on them.
        """
        assert num_slots > self.num_slots, (num_slots, self.num_slots)
        old = self.num_slots
        self._num_slots = num_slots
        self._free.extend(range(old, num_slots))
        if self.biases is not None:  # new tensors: computes holding the old ones keep them
            hidden, inter = self._shape
            gate_up_bias = self.biases.gate_up.new_zeros(num_slots, 2 * inter)
            down_bias = self.biases.down.new_zeros(num_slots, hidden)
            gate_up_bias[:old].copy_(self.biases.gate_up)
            down_bias[:old].copy_(self.biases.down)
            self.biases = ExpertBiases(gate_up_bias, down_bias)
        if self.layout == "packed":  # new slot tensors; the old ones stay where they are
            self._append_packed(num_slots - old)
            return
        hidden, inter = self._shape
        two_inter = 2 * inter
        gate_up = stack_slots(num_slots, hidden, two_inter, self.dtype, self.device, self.in_out)
        down = stack_slots(num_slots, inter, hidden, self.dtype, self.device, self.in_out)
        gate_up[:old].copy_(self.gate_up)
        down[:old].copy_(self.down)
        self.gate_up, self.down = gate_up, down

    def lookup(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Slot of each chosen expert, ``NO_SLOT`` where the id is negative (padding).

        expert_ids [T, K] long -> [T, K] long. Raises ``MissingExpertError`` naming the
        lowest expert that is not held (one host sync, skipped when every expert is held).
        """
        expert_ids = expert_ids.to(self._slot_map.device)  # [T, K] (no-op when already there)
        pad = expert_ids < 0  # [T, K]
        slot_ids = self._slot_map[expert_ids.clamp(min=0)].masked_fill_(pad, NO_SLOT)  # [T, K]
        if not self.is_complete:
            missing = (slot_ids == NO_SLOT) & ~pad  # [T, K]
            if bool(missing.any()):
                first = int(expert_ids[missing].min())
                raise MissingExpertError(
                    f"expert {first} is not held (held: {self.experts})", expert=first
                )
        return slot_ids


def load_expert_slots(
    reader: CheckpointReader,
    layer: int,
    experts: Sequence[int],
    device: str | torch.device = "cpu",
    num_slots: int | None = None,
) -> ExpertSlots:
    """``experts`` of ``layer`` read into a new ``ExpertSlots`` (``num_slots``, default: exactly
    enough), one expert at a time, so peak memory is the slots plus one expert."""
    assert experts, f"no experts to load for layer {layer}"
    spec = reader.spec
    slots: ExpertSlots | None = None
    for expert in experts:
        weights = load_expert(reader, layer, expert, str(device))
        if slots is None:
            slots = ExpertSlots.for_spec(
                spec, num_slots or len(experts), weights.gate_up.dtype, device
            )
        slots.add(expert, weights)
    assert slots is not None
    return slots
