"""Config-file pins: the engine computes each configured prefix at start and pins it.

``tiers[].engine.pinned_prefixes`` lists prefixes (a system prompt's text or token ids, a
time to live, a tenant). At start each becomes one request of one output token (discarded:
nobody listens to its id) with ``pin_tokens`` = the whole prefix, so the engine's own
admission computes it, or fetches it from the cluster store, and pins its full blocks like a
request's pin: soft, evicted after unpinned blocks, within the block manager's pinned share
(the config checked the share once the pool's size is known, here). Published blocks are
pinned in the store for what is left of the pin, and their KV events carry the pin, so
routers prefer replicas holding them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cluster.engine.config import EngineConfig, PinnedPrefix
from cluster.engine.requests import EngineRequest
from experts.sampling_params import SamplingParams

PIN_REQUEST_PREFIX = "config-pin-"


class _Blocks(Protocol):
    @property
    def num_blocks(self) -> int: ...


class _Engine(Protocol):
    config: EngineConfig
    tokenizer: Any
    blocks: Any  # a BlockManager: its num_blocks

    def add_request(self, request: EngineRequest) -> None: ...


def pin_requests(pins: Sequence[PinnedPrefix], tokenizer: Any) -> list[EngineRequest]:
    """One request per prefix; a text prefix needs the tier's tokenizer."""
    requests = []
    for i, pin in enumerate(pins):
        if pin.token_ids:
            ids = list(pin.token_ids)
        elif tokenizer is None:
            raise ValueError(
                f"pinned_prefixes[{i}].text needs the model's tokenizer (tokenizer.json), "
                "which this checkpoint lacks: give token_ids instead"
            )
        else:
            ids = list(tokenizer.encode(pin.text).ids)
        requests.append(
            EngineRequest(
                request_id=f"{PIN_REQUEST_PREFIX}{i}",
                prompt_ids=ids,
                params=SamplingParams(max_tokens=1),
                cache_salt=pin.tenant,
                pin_tokens=len(ids),
                pin_ttl_s=pin.ttl_s,
            )
        )
    return requests


def pin_config_prefixes(engine: _Engine) -> int:
    """Queue the engine's configured pins (before it serves); returns how many."""
    pins = engine.config.pinned_prefixes
    if not pins:
        return 0
    blocks: _Blocks = engine.blocks
    engine.config.check_pinned_share(blocks.num_blocks)
    for request in pin_requests(pins, engine.tokenizer):
        engine.add_request(request)
    return len(pins)
