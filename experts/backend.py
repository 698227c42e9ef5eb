"""The expert-backend interface the backbone calls for every MoE layer.

The backbone computes the gate and hands each layer's tokens, chosen experts
and weights to a backend. ``ColocatedExperts`` computes them in-process; the
remote backend (expert shards on Ray) implements the same Protocol, so
placement is a choice of backend, never a branch in the model maths.

Legend: T tokens, K experts per token, H hidden.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from experts.checkpoint import CheckpointReader
from experts.ffn import run_routed_experts
from experts.weights import MLPWeights, load_experts


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
    """Every routed expert of the model, in this process, on one device."""

    def __init__(self, experts: dict[tuple[int, int], MLPWeights]) -> None:
        self._experts = experts

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
        return cls(load_experts(reader, pairs, device))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self._experts)

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        def lookup(expert: int) -> MLPWeights:
            found = self._experts.get((layer, expert))
            assert found is not None, f"expert ({layer}, {expert}) is not loaded here"
            return found

        return run_routed_experts(hidden, expert_ids, weights, lookup)
