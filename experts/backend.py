"""The expert-backend interface the backbone calls for every MoE layer.

The backbone computes the gate and hands each layer's tokens, chosen experts
and weights to a backend. ``ColocatedExperts`` computes them in-process; the
remote backend (expert shards on Ray) implements the same Protocol, so
placement is a choice of backend, never a branch in the model maths. Both run
the same kernels over experts held in fixed slots (``experts.expert_slots``).

Legend: T tokens, K experts per token, H hidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch

from experts.checkpoint import CheckpointReader
from experts.expert_slots import ExpertSlots, MissingExpertError, load_expert_slots


class ExpertBackend(Protocol):
    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, K]
        weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:  # [T, H] weighted sum of the chosen experts' outputs
        ...


class ExpertBackendFactory(Protocol):
    """A picklable recipe for an expert backend, built where the engine runs (for example in
    an engine process, which cannot receive a live backend: it holds channels and threads)."""

    def build(self) -> ExpertBackend: ...


class ColocatedExperts:
    """Every routed expert of the model (or the chosen ones), in this process, on one device:
    each MoE layer's experts stacked in ``ExpertSlots``, computed with the grouped kernel."""

    def __init__(self, layers: Mapping[int, ExpertSlots]) -> None:
        self._layers = dict(layers)

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        pairs: Iterable[tuple[int, int]] | None = None,
        device: str = "cpu",
    ) -> ColocatedExperts:
        """Load ``pairs`` of (layer, expert), or all of them when ``pairs`` is None."""
        spec = reader.spec
        if pairs is None:
            pairs = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
        by_layer: dict[int, list[int]] = {}
        for layer, e in sorted(set(pairs)):
            by_layer.setdefault(layer, []).append(e)
        return cls(
            {layer: load_expert_slots(reader, layer, es, device) for layer, es in by_layer.items()}
        )

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted((layer, e) for layer, slots in self._layers.items() for e in slots.experts)

    def layer_slots(self, layer: int) -> ExpertSlots:
        """The layer's slots (placement rewrites them in place)."""
        return self._layers[layer]

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        slots = self._layers.get(layer)
        if slots is None:
            raise MissingExpertError(f"no expert of layer {layer} is loaded here")
        slot_ids = slots.lookup(expert_ids)  # [T, K]
        return slots.expert_sum(hidden, slot_ids, weights)
