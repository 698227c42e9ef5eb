"""The "run the model" part of an engine step: ids and block tables in, next-token logits out.

Legend: B sequences in the step, V vocab, L layers, P probed sequences.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.kv_pool import KVPool
from experts.attention import AttentionBatch, SequenceChunk
from experts.model import MoEModel


@dataclass(frozen=True)
class StepInput:
    """One sequence's work in a step: ``token_ids`` are new, ``num_cached`` keys are cached.

    ``attention_first_keys`` asks for attention diagnostics at the last new token: how many
    of the sequence's keys (cached, then new) hold its first tokens; None: not probed.
    """

    token_ids: Sequence[int]
    block_table: Sequence[int]
    num_cached: int
    start_position: int
    attention_first_keys: int | None = None
    # per sliding KV group (at most one): its block table and the computed keys it holds
    windows: Sequence[tuple[Sequence[int], int]] = ()


class ModelRunner:
    """Owns the model and its KV pool; turns a step's inputs into tensors and runs them."""

    def __init__(self, model: MoEModel, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        # [B, L_moe, K] experts the gate chose at each sequence's last position (last run)
        self.routing: torch.Tensor | None = None
        # input index -> per layer (entropy, first-token mass) at its last position (last run),
        # for the inputs with ``attention_first_keys``
        self.attention: dict[int, list[tuple[float, float]]] = {}
        # [L_moe, E] tokens routed to each (MoE layer, expert) since the last take_routed_counts;
        # kept only when ``count_routing`` is on (telemetry): one bincount per layer per step
        self.count_routing = False
        self._routed: torch.Tensor | None = None
        self._routed_lock = threading.Lock()  # the engine thread adds, telemetry takes

    @torch.inference_mode()
    def run(
        self, inputs: Sequence[StepInput], capture_routing: bool = False
    ) -> torch.Tensor:  # [B, V] fp32
        """Forward every sequence's new tokens; logits of each sequence's last token.

        With ``capture_routing`` the gate's choices at those positions land in ``routing``;
        attention diagnostics of the inputs that ask for them land in ``attention``.
        """
        chunks = [
            SequenceChunk(i.block_table, i.num_cached, len(i.token_ids), i.start_position)
            for i in inputs
        ]
        # windowed sequences may run past the trained context: grow the rotary tables
        self.model.rope.ensure(max(i.start_position + len(i.token_ids) for i in inputs))
        probe = {
            b: i.attention_first_keys
            for b, i in enumerate(inputs)
            if i.attention_first_keys is not None
        }
        windows = [i.windows[0] for i in inputs] if inputs[0].windows else None
        batch = AttentionBatch.build(
            chunks, self.pool.block_size, self.model.device, probe, windows
        )
        ids = torch.tensor(
            [t for i in inputs for t in i.token_ids], dtype=torch.long, device=self.model.device
        )
        layers: list[torch.Tensor] = []  # per MoE layer: [T, K]
        observe = (capture_routing or self.count_routing) and self.model.spec.is_moe
        if observe:
            self.model.route_observer = lambda _layer, chosen: layers.append(chosen)
        try:
            hidden = self.model.forward(ids, batch, self.pool)  # [T, H]
        finally:
            self.model.route_observer = None
        if self.count_routing and layers:
            self._count(layers)
        captured = capture_routing and layers
        self.routing = torch.stack(layers, 1)[batch.last_index] if captured else None  # [B, L, K]
        self.attention = _attention_stats(batch, sorted(probe))
        return self.model.logits(hidden[batch.last_index])  # [B, V]

    def _count(self, layers: list[torch.Tensor]) -> None:
        num_experts = self.model.spec.num_experts
        counts = torch.stack(
            [torch.bincount(chosen.reshape(-1).cpu(), minlength=num_experts) for chosen in layers]
        )  # [L_moe, E]
        with self._routed_lock:
            self._routed = counts if self._routed is None else self._routed + counts

    def take_routed_counts(self) -> dict[tuple[int, int], int]:
        """Tokens routed per (layer, expert) since the last call, and start counting afresh."""
        with self._routed_lock:
            counts, self._routed = self._routed, None
        if counts is None:
            return {}
        layers = self.model.spec.moe_layers
        return {
            (layers[slot], expert): int(n)
            for slot, row in enumerate(counts.tolist())
            for expert, n in enumerate(row)
            if n
        }


def _attention_stats(
    batch: AttentionBatch, probed: list[int]
) -> dict[int, list[tuple[float, float]]]:
    """Input index -> per layer (entropy, first mass); the probe's rows follow ``probed``."""
    if batch.probe is None:
        return {}
    stats = torch.stack(
        [torch.stack(pair, -1) for pair in batch.probe.results], 1
    ).tolist()  # [P, L, 2], one device sync
    return {b: [(e, m) for e, m in per_layer] for b, per_layer in zip(probed, stats, strict=True)}
