"""The KV tensor pool: preallocated key and value blocks for every layer.

A model whose cache holds one entry per token instead of a key and a value (multi-head
latent attention: a latent and a rotary key) uses one plane (``num_planes=1``): ``key``
is that entry, and there is no ``value``.

A model whose layers fall into KV groups (full and sliding-window attention, see
``cache.block_manager``) gives each layer a slot (``layer_slots``): a block belongs to one
group, and slot j of the block holds the group's j-th layer, so the pool stores as many
layer slots as the largest group has layers, not one per layer.

Legend: L layers, N blocks, S = N * block_size slots, Hkv kv heads, D head dim, P planes.
"""

from __future__ import annotations

import torch


class KVPool:
    """Key/value storage for ``num_blocks`` blocks of ``block_size`` tokens, all layers."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        num_planes: int = 2,
        layer_slots: tuple[int, ...] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        assert num_planes in (1, 2), f"num_planes={num_planes}: keys and values, or one entry"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_planes = num_planes
        # layer -> its slot in the pool (None: one slot per layer)
        self._slot = layer_slots if layer_slots is not None else tuple(range(num_layers))
        assert len(self._slot) == num_layers, f"{len(self._slot)} slots for {num_layers} layers"
        num_slots = max(self._slot) + 1
        slots = num_blocks * block_size
        # [L, P, S, Hkv, D], L layer slots: one allocation, so the budget is exact, views free
        self._data = torch.zeros(
            num_slots, num_planes, slots, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_planes: int = 2,
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * num_planes * block_size * num_kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self._data.numel() * self._data.element_size()

    def key(self, layer: int) -> torch.Tensor:  # [S, Hkv, D]
        return self._data[self._slot[layer], 0]

    def value(self, layer: int) -> torch.Tensor:  # [S, Hkv, D]
        assert self.num_planes == 2, "a one-plane pool holds no values"
        return self._data[self._slot[layer], 1]

    @torch.inference_mode()
    def zero_slots(self, slots: list[int]) -> None:
        """Zero the keys and values of these flat slots in every layer (a failed chunk's
        K/V): a block belongs to one group, so every layer slot of it is that group's."""
        if slots:
            index = torch.tensor(slots, dtype=torch.long, device=self._data.device)
            self._data.index_fill_(2, index, 0.0)

    @torch.inference_mode()
    def copy_slots(self, src_block: int, dst_block: int, count: int) -> None:
        """Copy the keys and values of the first ``count`` slots of ``src_block`` into
        ``dst_block``, every layer in one copy."""
        if not 0 < count <= self.block_size:
            raise ValueError(f"count={count} must be in [1, {self.block_size}]")
        for block in (src_block, dst_block):
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"block {block} is outside the pool [0, {self.num_blocks})")
        if src_block == dst_block:
            return
        src, dst = src_block * self.block_size, dst_block * self.block_size
        # [L, P, count, Hkv, D]
        self._data[:, :, dst : dst + count] = self._data[:, :, src : src + count]
