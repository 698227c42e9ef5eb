"""An expert shard: a set of (layer, expert) slots on one device, and their compute.

The shard loads only its own slots' tensors from the checkpoint and computes,
for the tokens a dispatcher sent it, the weighted sum of the experts it holds.
It knows nothing about Ray or placement: which slots it holds is decided
outside and applied with ``load`` / ``drop``.

Legend: N tokens sent to this shard, K' (expert, weight) pairs per token on this shard
(padded), H hidden.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from experts.checkpoint import CheckpointReader
from experts.ffn import group_by_expert, swiglu_mlp
from experts.weights import MLPWeights, load_expert

PAD_EXPERT = -1  # expert id of a padding pair (its weight is 0); compute skips it

Slot = tuple[int, int]  # (layer, expert)


class MissingExpertError(LookupError):
    """A compute call needs a (layer, expert) this shard does not hold (dropped or never loaded).

    A remote backend can catch it and re-plan with a newer routing table.
    """


def format_slots(slots: Iterable[Slot]) -> str:
    """``layer 0: [0, 3]; layer 2: [1]``, compact enough for error messages."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(slots):
        by_layer.setdefault(layer, []).append(expert)
    return "; ".join(f"layer {layer}: {experts}" for layer, experts in by_layer.items()) or "none"


class ExpertShard:
    """Routed experts of chosen (layer, expert) slots, on one device, read from a checkpoint."""

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", slots: Iterable[Slot] = ()
    ) -> None:
        self.reader = CheckpointReader(model_dir)
        self.device = device
        self._experts: dict[Slot, MLPWeights] = {}
        # load, drop and compute may come from different threads (a Ray actor's own thread
        # and its data-plane channels): the slot map changes only under this lock
        self._lock = threading.Lock()
        self.load(slots)

    @property
    def slots(self) -> list[Slot]:
        with self._lock:
            return sorted(self._experts)

    def has(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._experts

    def load(self, slots: Iterable[Slot]) -> list[Slot]:
        """Read the slots not already held; returns the newly loaded ones, sorted.

        All-or-nothing: every tensor is read before any slot becomes visible, so a
        failed read (bad slot, missing tensor) leaves the shard exactly as it was.
        Held slots are never re-read or replaced, so calls between loads see the
        same weights for them. Computes go on while the tensors are read.
        """
        with self._lock:
            new = sorted({(int(layer), int(e)) for layer, e in slots} - self._experts.keys())
        loaded = {(layer, e): load_expert(self.reader, layer, e, self.device) for layer, e in new}
        with self._lock:
            for slot, weights in loaded.items():
                self._experts.setdefault(slot, weights)  # a concurrent load may have won
        return new

    def drop(self, slots: Iterable[Slot]) -> None:
        """Release the slots' weights; dropping a slot this shard does not hold is an error.

        Checked before anything is released, so a bad request drops nothing.
        """
        wanted = {(int(layer), int(e)) for layer, e in slots}
        with self._lock:
            missing = wanted - self._experts.keys()
            if missing:
                raise ValueError(
                    f"cannot drop {format_slots(missing)}: not held by this shard "
                    f"(it holds {format_slots(self._experts)})"
                )
            for slot in wanted:
                del self._experts[slot]

    def _lookup(self, layer: int, experts: Iterable[int]) -> dict[int, MLPWeights]:
        """The weights of every expert a call needs, or an error naming the first one missing."""
        found: dict[int, MLPWeights] = {}
        with self._lock:  # held weights stay valid for the call even if dropped meanwhile
            for e in experts:
                w = self._experts.get((layer, e))
                if w is None:
                    raise MissingExpertError(
                        f"expert (layer {layer}, expert {e}) is not loaded on this shard "
                        f"(it holds {format_slots(self._experts)}); the dispatcher's routing "
                        "table is out of date or the slot was dropped"
                    )
                found[e] = w
        return found

    def compute(
        self,
        layer: int,
        hidden: torch.Tensor,  # [N, H] the tokens routed to this shard
        expert_ids: torch.Tensor,  # [N, K'] long, PAD_EXPERT where padded
        weights: torch.Tensor,  # [N, K'] fp32 gate weights, 0 where padded
    ) -> torch.Tensor:  # [N, H] per token: sum of weight * expert(token) over its pairs
        """Each row's weighted sum over its pairs, experts summed in increasing expert order.

        Experts are run one at a time on the rows that chose them (like
        ``run_routed_experts``). Floating-point caveat: with all of a token's experts on
        this shard and every expert unreplicated, the rows each expert sees and the
        order of the sum match the colocated backend, so the result is bit-identical;
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
        out = torch.zeros_like(hidden)  # [N, H]
        num_k = expert_ids.shape[1]
        if num_k == 0:
            return out
        groups = [(e, rows) for e, rows in group_by_expert(expert_ids) if e != PAD_EXPERT]
        mlps = self._lookup(layer, (e for e, _ in groups))  # all checked before any compute
        flat_weights = weights.reshape(-1)  # [N*K']
        for e, slots in groups:
            tokens = slots // num_k  # [n] rows of this shard's batch that chose e
            y = swiglu_mlp(hidden[tokens], mlps[e])  # [n, H]
            y = y * flat_weights[slots, None]  # [n, H] fp32 weights, like the reference
            out.index_put_((tokens,), y.to(out.dtype), accumulate=True)
        return out
