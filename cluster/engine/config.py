"""The engine's settings: KV memory and batching limits (torch-free: the config edge reads it).

This dataclass is the one definition of ``tiers[].engine``: its defaults are the config
file's, and ``__post_init__`` holds every check (the edge validates YAML through it).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BLOCK_SIZE = 1024  # tokens per KV block


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
