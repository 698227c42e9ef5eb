"""The engine's settings: KV memory and batching limits (torch-free: the config edge reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """KV memory and batching limits of one engine."""

    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size={self.block_size} must be in [1, 1024]")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks={self.num_blocks} must be > 0")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} must be > 0")

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
