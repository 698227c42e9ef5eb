"""Cluster-wide names of KV blocks: the chained prefix hash inside a namespace.

A replica's local cache names a full block by its chained prefix hash (``prefix_hash``), which
already starts at the tenant's root. Across the cluster that is not enough: two models, or one
model with two KV layouts (dtype, kv heads, head dim, layers, block size), compute different
K/V for the same tokens. So a cluster block key is

    namespace (16 bytes) || chained prefix hash (8 bytes)

where the namespace is a blake2b digest, in its own domain, of the model identity, the KV layout
and the tenant salt, each length-prefixed (no two field lists encode alike). Two keys are equal
only when all of them are: two models, two layouts or two tenants never share (or time) a block
in the store or in a router's index. Torch-free: the router computes keys for requests too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BlockKey = bytes  # NAMESPACE_BYTES of namespace, then the 8-byte little-endian chain hash
NAMESPACE_BYTES = 16
KEY_BYTES = NAMESPACE_BYTES + 8
_MAX_CACHED_NAMESPACES = 4096  # salts seen recently; each entry is ~100 bytes


@dataclass(frozen=True)
class KVLayout:
    """How one block's K/V sit in memory: its bytes mean nothing under another layout."""

    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    num_planes: int = 2  # a key and a value per token; 1: one entry (latent attention)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_planes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value} is out of range: allowed >= 1")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """One block's K/V: [L, P, block_size, Hkv, D]."""
        return (self.num_layers, self.num_planes, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_per_block(self, itemsize: int) -> int:
        layers, planes, size, heads, dim = self.shape
        return layers * planes * size * heads * dim * itemsize


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


class KeySpace:
    """Block keys for one model and KV layout, any tenant.

    ``namespace(salt)`` is cached per salt (bounded LRU), so a key costs one dict lookup and a
    concatenation on top of the chained hash the scheduler already computed.
    """

    def __init__(self, model_id: str, layout: KVLayout) -> None:
        if not model_id:
            raise ValueError("model_id='' is empty: give the model's fingerprint")
        self.model_id = model_id
        self.layout = layout
        self._prefix = b"".join(
            _field(part)
            for part in (
                model_id.encode(),
                layout.dtype.encode(),
                *(n.to_bytes(8, "little") for n in layout.shape),
            )
        )
        self._namespaces: OrderedDict[str, bytes] = OrderedDict()

    def namespace(self, salt: str) -> bytes:
        """The 16-byte namespace of this model and layout for tenant ``salt``."""
        found = self._namespaces.get(salt)
        if found is not None:
            self._namespaces.move_to_end(salt)
            return found
        digest = hashlib.blake2b(digest_size=NAMESPACE_BYTES, person=b"kv-block-ns")
        digest.update(self._prefix)
        digest.update(_field(salt.encode("utf-8", "surrogatepass")))
        namespace = digest.digest()
        self._namespaces[salt] = namespace
        if len(self._namespaces) > _MAX_CACHED_NAMESPACES:
            self._namespaces.popitem(last=False)
        return namespace

    def keys(self, salt: str, chain_hashes: Iterable[int]) -> list[BlockKey]:
        """The cluster keys of a tenant's blocks named by their chained prefix hashes."""
        namespace = self.namespace(salt)
        return [namespace + h.to_bytes(8, "little") for h in chain_hashes]

    def key(self, salt: str, chain_hash: int) -> BlockKey:
        return self.namespace(salt) + chain_hash.to_bytes(8, "little")


def chain_hash_of(key: BlockKey) -> int:
    """The chained prefix hash inside a key."""
    assert len(key) == KEY_BYTES, f"a block key has {KEY_BYTES} bytes, not {len(key)}"
    return int.from_bytes(key[NAMESPACE_BYTES:], "little")


def ring_point(key: BlockKey) -> int:
    """A 64-bit point for consistent hashing: the chain hash mixed with the namespace (both
    already uniform), so one tenant's blocks spread over the shards like everyone's."""
    return int.from_bytes(key[NAMESPACE_BYTES:], "little") ^ int.from_bytes(key[:8], "little")


_SAMPLE_CHUNKS = 16
_SAMPLE_BYTES = 4096


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A model's identity for block keys: its config, and a sample of each weight file.

    Two checkpoints with the same config but other weights (another seed, a fine-tune) must not
    share blocks, so besides ``config.json`` and each safetensors file's name, size and header,
    ``_SAMPLE_CHUNKS`` evenly spaced chunks of its data are hashed (a few hundred kB read,
    whatever the checkpoint's size). Returns 32 hex characters.
    """
    root = Path(model_dir)
    digest = hashlib.blake2b(digest_size=16, person=b"kv-model-id")
    config = root / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        digest.update(_field(json.dumps(data, sort_keys=True).encode()))
    for path in sorted(root.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(_field(path.name.encode()) + size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 1 << 24)))
            start = 8 + header_len
            span = max(0, size - start - _SAMPLE_BYTES)
            for i in range(_SAMPLE_CHUNKS):
                f.seek(start + span * i // max(1, _SAMPLE_CHUNKS - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()
