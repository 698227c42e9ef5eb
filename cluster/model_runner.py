"""The "run the model" part of an engine step: ids and block tables in, next-token logits out.

Legend: B sequences in the step, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.kv_pool import KVPool
from experts.attention import AttentionBatch, SequenceChunk
from experts.model import MoEModel


@dataclass(frozen=True)
class StepInput:
    """One sequence's work in a step: ``token_ids`` are new, ``num_cached`` keys are cached."""

    token_ids: Sequence[int]
    block_table: Sequence[int]
    num_cached: int
    start_position: int


class ModelRunner:
    """Owns the model and its KV pool; turns a step's inputs into tensors and runs them."""

    def __init__(self, model: MoEModel, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        # [B, L_moe, K] experts the gate chose at each sequence's last position (last run)
        self.routing: torch.Tensor | None = None

    @torch.inference_mode()
    def run(
        self, inputs: Sequence[StepInput], capture_routing: bool = False
    ) -> torch.Tensor:  # [B, V] fp32
        """Forward every sequence's new tokens; logits of each sequence's last token.

        With ``capture_routing`` the gate's choices at those positions land in ``routing``.
        """
        chunks = [
            SequenceChunk(i.block_table, i.num_cached, len(i.token_ids), i.start_position)
            for i in inputs
        ]
        # windowed sequences may run past the trained context: grow the rotary tables
        self.model.rope.ensure(max(i.start_position + len(i.token_ids) for i in inputs))
        batch = AttentionBatch.build(chunks, self.pool.block_size, self.model.device)
        ids = torch.tensor(
            [t for i in inputs for t in i.token_ids], dtype=torch.long, device=self.model.device
        )
        layers: list[torch.Tensor] = []  # per MoE layer: [T, K]
        if capture_routing:
            self.model.route_observer = lambda _layer, chosen: layers.append(chosen)
        try:
            hidden = self.model.forward(ids, batch, self.pool)  # [T, H]
        finally:
            self.model.route_observer = None
        self.routing = torch.stack(layers, 1)[batch.last_index] if layers else None  # [B, L, K]
        return self.model.logits(hidden[batch.last_index])  # [B, V]
