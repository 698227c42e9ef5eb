"""An expert shard: a set of (layer, expert) slots on one device, and their compute.

The shard loads only its own slots' tensors from the checkpoint and computes,
for the tokens a dispatcher sent it, the weighted sum of the experts it holds.
It knows nothing about Ray or placement: which slots it holds is decided
outside and applied with ``load`` / ``drop``.

Each layer's experts are stacked in ``ExpertSlots`` (storage slots, written in
place) and computed with the same grouped kernel as the colocated backend.

Legend: N tokens sent to this shard, K' (expert, weight) pairs per token on this shard
(padded), H hidden.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from experts.checkpoint import CheckpointReader
from experts.expert_slots import NO_SLOT, ExpertSlots, MissingExpertError
from experts.weights import MLPWeights, load_expert

PAD_EXPERT = NO_SLOT  # expert id of a padding pair (its weight is 0); compute skips it

Slot = tuple[int, int]  # (layer, expert)

__all__ = ["PAD_EXPERT", "ExpertShard", "MissingExpertError", "Slot", "format_slots"]


def format_slots(slots: Iterable[Slot]) -> str:
    """``layer 0: [0, 3]; layer 2: [1]``, compact enough for error messages."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(slots):
        by_layer.setdefault(layer, []).append(expert)
    return "; ".join(f"layer {layer}: {experts}" for layer, experts in by_layer.items()) or "none"


class ExpertShard:
    """Routed experts of chosen (layer, expert) slots, on one device, read from a checkpoint.

    A layer's storage is allocated on its first load with ``slots_per_layer`` storage slots
    (default: that load's count) and grows by doubling when a load finds none free, so a
    placement that sizes it up front never reallocates. A dropped expert's storage slot is
    written again only once every compute that started before the drop has finished.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        slots: Iterable[Slot] = (),
        slots_per_layer: int | None = None,
    ) -> None:
        self.reader = CheckpointReader(model_dir)
        self.device = device
        self.slots_per_layer = slots_per_layer
        self._layers: dict[int, ExpertSlots] = {}
        # load, drop and compute may come from different threads (a Ray actor's own thread
        # and its data-plane channels): the slot tables change only under this lock
        self._lock = threading.Lock()
        # one load at a time: the slots a load reserves are written outside ``_lock`` (no
        # compute reads a reserved slot, and only a load grows a layer's storage)
        self._load_lock = threading.Lock()
        self._num_drops = 0
        self._running: dict[int, int] = {}  # computes in flight, by num_drops at their start
        self._retired: list[tuple[int, int, list[int]]] = []  # (num_drops then, layer, slots)
        self.load(slots)

    def _held(self) -> list[Slot]:
        return sorted((layer, e) for layer, s in self._layers.items() for e in s.experts)

    @property
    def slots(self) -> list[Slot]:
        with self._lock:
            return self._held()

    def has(self, layer: int, expert: int) -> bool:
        layer_slots = self._layers.get(layer)
        return layer_slots is not None and layer_slots.has(expert)

    def load(self, slots: Iterable[Slot]) -> list[Slot]:
        """Read the slots not already held; returns the newly loaded ones, sorted.

        All-or-nothing: every tensor is read before any slot becomes visible, so a
        failed read (bad slot, missing tensor) leaves the shard exactly as it was.
        Held slots are never re-read or replaced, so calls between loads see the
        same weights for them. Computes go on while the tensors are read.
        """
        with self._load_lock:
            with self._lock:
                new = sorted({(int(layer), int(e)) for layer, e in slots} - set(self._held()))
            loaded = {
                (layer, e): load_expert(self.reader, layer, e, self.device) for layer, e in new
            }
            reserved: list[tuple[ExpertSlots, int, int, MLPWeights]] = []
            with self._lock:  # only bookkeeping under the lock computes take
                self._reclaim()
                for (layer, e), weights in loaded.items():
                    layer_slots = self._layers.get(layer) or self._new_layer(layer, loaded, weights)
                    if not layer_slots.num_free:
                        layer_slots.grow(2 * layer_slots.num_slots)
                    reserved.append((layer_slots, e, layer_slots.take_free_slot(), weights))
            # the copies (and CPU prepacking) run while computes go on: no compute reads a
            # reserved slot before it is assigned
            try:
                for layer_slots, _, slot, weights in reserved:
                    layer_slots.write_slot(slot, weights)
            except BaseException:
                with self._lock:  # nothing became visible: the reserved slots are free again
                    for layer_slots, _, slot, _ in reserved:
                        layer_slots.release([slot])
                raise
            with self._lock:
                for layer_slots, e, slot, _ in reserved:
                    layer_slots.assign(e, slot)
        return new

    def _new_layer(
        self, layer: int, loaded: dict[Slot, MLPWeights], first: MLPWeights
    ) -> ExpertSlots:
        count = self.slots_per_layer or sum(1 for other, _ in loaded if other == layer)
        self._layers[layer] = ExpertSlots.for_spec(
            self.reader.spec, count, first.gate_up.dtype, self.device
        )
        return self._layers[layer]

    def drop(self, slots: Iterable[Slot]) -> None:
        """Stop serving the slots; dropping a slot this shard does not hold is an error.

        Checked before anything is released, so a bad request drops nothing.
        """
        wanted = {(int(layer), int(e)) for layer, e in slots}
        with self._lock:
            missing = wanted - set(self._held())
            if missing:
                raise ValueError(
                    f"cannot drop {format_slots(missing)}: not held by this shard "
                    f"(it holds {format_slots(self._held())})"
                )
            for layer, e in sorted(wanted):
                self._retired.append((self._num_drops, layer, self._layers[layer].remove(e)))
            self._num_drops += 1
            self._reclaim()

    def _reclaim(self) -> None:
        """Free the retired storage slots no running compute can still read (under the lock)."""
        oldest = min(self._running, default=self._num_drops)
        for stamp, layer, storage in self._retired:
            if stamp < oldest:
                self._layers[layer].release(storage)
        self._retired = [r for r in self._retired if r[0] >= oldest]

    def _missing(self, layer: int, expert: int) -> MissingExpertError:
        return MissingExpertError(
            f"expert (layer {layer}, expert {expert}) is not loaded on this shard "
            f"(it holds {format_slots(self._held())}); the dispatcher's routing "
            "table is out of date or the slot was dropped",
            expert=expert,
        )

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor,  # [N, H] the tokens routed to this shard
        expert_ids: torch.Tensor,  # [N, K'] long, PAD_EXPERT where padded
        weights: torch.Tensor,  # [N, K'] fp32 gate weights, 0 where padded
    ) -> torch.Tensor:  # [N, H] per token: sum of weight * expert(token) over its pairs
        """Each row's weighted sum over its pairs, by the grouped kernel.

        Floating-point caveat: with all of a token's experts on this shard and every
        expert unreplicated, each expert sees the rows it sees in the colocated backend
        and each row sums its pairs in the same order, so the result is bit-identical;
        once a token's experts are split across shards, partial sums are added in
        another association order (exact for two experts, since addition commutes,
        but a few ulps off for three or more).
        """
        assert hidden.dim() == 2 and expert_ids.dim() == 2, (
            f"hidden {tuple(hidden.shape)} and expert_ids {tuple(expert_ids.shape)} must be 2-D"
        )
        assert expert_ids.shape == weights.shape and expert_ids.shape[0] == hidden.shape[0], (
            f"hidden {tuple(hidden.shape)}, expert_ids {tuple(expert_ids.shape)}, "
            f"weights {tuple(weights.shape)} disagree"
        )
        # a data plane may hand over the routing on the host: the kernel wants one device
        expert_ids, weights = expert_ids.to(hidden.device), weights.to(hidden.device)
        with self._lock:  # the slots read here stay unwritten until this compute ends
            layer_slots = self._layers.get(layer)
            if layer_slots is None:
                wanted = expert_ids[expert_ids != PAD_EXPERT]  # [n]
                if wanted.numel():
                    raise self._missing(layer, int(wanted.min()))
                return torch.zeros_like(hidden)
            try:
                slot_ids = layer_slots.lookup(expert_ids)  # [N, K']
            except MissingExpertError as err:
                raise self._missing(layer, err.expert) from None
            slot_weights = layer_slots.snapshot()
            started = self._num_drops
            self._running[started] = self._running.get(started, 0) + 1
        try:
            return slot_weights.expert_sum(hidden, slot_ids, weights)
        finally:
            with self._lock:
                self._running[started] -= 1
                if not self._running[started]:
                    del self._running[started]
