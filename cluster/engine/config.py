"""The engine's settings: KV memory and batching limits (torch-free: the config edge reads it).

This dataclass is the one definition of ``tiers[].engine``: its defaults are the config
file's, and ``__post_init__`` holds every check (the edge validates YAML through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_BLOCK_SIZE = 1024  # tokens per KV block
# config pins: a few prefixes (system prompts), each bounded, together at most the share of
# the cache the block manager lets pins hold (its max_pinned_share: pins stay soft)
MAX_CONFIG_PINS = 16
MAX_PIN_PREFIX_TOKENS = 8192  # token ids of one pinned prefix
MAX_PIN_PREFIX_CHARS = 32_768  # text of one pinned prefix
MAX_CONFIG_PIN_TTL_S = 86_400.0
PINNED_SHARE = 0.25  # of an engine's KV blocks that pins may hold (BlockManager's default)


@dataclass(frozen=True)
class PinnedPrefix:
    """A prefix the engine computes and pins at start (a soft pin: evicted last, for
    ``ttl_s`` seconds from then), for the tenant ``tenant`` (the id the gateway derives from
    an API key, ``deploy.edge_config.tenant_of``; "" with authentication off). Exactly one of
    ``text`` (tokenized by the tier's tokenizer) or ``token_ids``."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    ttl_s: float = MAX_CONFIG_PIN_TTL_S
    tenant: str = ""

    def __post_init__(self) -> None:
        if bool(self.text) == bool(self.token_ids):
            raise ValueError("pinned_prefixes: give exactly one of 'text' or 'token_ids'")
        if len(self.text) > MAX_PIN_PREFIX_CHARS:
            raise ValueError(
                f"text={len(self.text)} characters is out of range: "
                f"allowed at most {MAX_PIN_PREFIX_CHARS}"
            )
        if len(self.token_ids) > MAX_PIN_PREFIX_TOKENS:
            raise ValueError(
                f"token_ids={len(self.token_ids)} ids is out of range: "
                f"allowed at most {MAX_PIN_PREFIX_TOKENS}"
            )
        if any(t < 0 for t in self.token_ids):
            raise ValueError("token_ids must be >= 0")
        if not (math.isfinite(self.ttl_s) and 0 < self.ttl_s <= MAX_CONFIG_PIN_TTL_S):
            raise ValueError(
                f"ttl_s={self.ttl_s} is out of range: allowed (0, {MAX_CONFIG_PIN_TTL_S:g}]"
            )
        if len(self.tenant) > 64:
            raise ValueError(f"tenant={len(self.tenant)} characters: allowed at most 64")

    @property
    def max_tokens(self) -> int:
        """An upper bound on its tokens (a token is at least one character of text)."""
        return len(self.token_ids) or len(self.text)


@dataclass(frozen=True)
class EngineConfig:
    """KV memory and batching limits of one engine.

    Invalid values raise ``ValueError`` starting with ``<field>=<value>`` and saying what is
    allowed.
    """

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 * 2**20  # the KV pool, preallocated
    max_num_seqs: int = 64  # running requests
    max_num_batched_tokens: int = 512  # tokens computed per step
    enable_prefix_caching: bool = True
    # prefixes computed and pinned at start (``PinnedPrefix``)
    pinned_prefixes: tuple[PinnedPrefix, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"block_size={self.block_size} is out of range: allowed [1, {MAX_BLOCK_SIZE}]"
            )
        positive = [
            ("num_blocks", self.num_blocks),
            ("kv_cache_bytes", self.kv_cache_bytes),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ]
        for name, value in positive:
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is out of range: allowed >= 1")
        self._check_pins()

    def _check_pins(self) -> None:
        pins = self.pinned_prefixes
        if len(pins) > MAX_CONFIG_PINS:
            raise ValueError(
                f"pinned_prefixes={len(pins)} prefixes is out of range: "
                f"allowed at most {MAX_CONFIG_PINS}"
            )
        if pins and not self.enable_prefix_caching:
            raise ValueError(
                "pinned_prefixes=... need enable_prefix_caching: true (a pin keeps cached blocks)"
            )
        if self.num_blocks is not None:  # else checked when the pool's size is known
            self.check_pinned_share(self.num_blocks)

    def check_pinned_share(self, num_blocks: int) -> None:
        """The pinned prefixes' blocks fit the share of ``num_blocks`` that pins may hold."""
        blocks = sum(p.max_tokens // self.block_size for p in self.pinned_prefixes)
        limit = int(num_blocks * PINNED_SHARE)
        if blocks > limit:
            raise ValueError(
                f"pinned_prefixes={blocks} blocks is out of range: allowed at most {limit} "
                f"({PINNED_SHARE:g} of the engine's {num_blocks} KV blocks)"
            )

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """``num_blocks``, or as many blocks of ``bytes_per_block`` as ``kv_cache_bytes`` holds."""
        if self.num_blocks is not None:
            return self.num_blocks
        per_block = bytes_per_block
        blocks = self.kv_cache_bytes // per_block
        if blocks <= 0:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes} holds no block of {per_block} bytes"
            )
        return int(blocks)
