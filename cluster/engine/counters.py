"""An engine's counters, shared by the engine, its process channel and the tier replica's
``TierStats`` on the gateway channel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCounters:
    """An engine's queue and KV figures and its running totals, at one moment."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_blocks_held: int
    num_prompt_tokens_computed: int
    num_steps: int
    num_preemptions: int
    num_evictions: int
