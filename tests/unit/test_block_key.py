"""Cluster block keys: model identity, KV layout and tenant salt all separate namespaces, so two
models, layouts or tenants never share (or time) a block in the store or a router's index."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_key import (
    KEY_BYTES,
    KeySpace,
    KVLayout,
    chain_hash_of,
    model_fingerprint,
    ring_point,
)
from cache.prefix_hash import hash_blocks, root_hash

LAYOUT = KVLayout("float32", num_layers=4, num_kv_heads=4, head_dim=32, block_size=16)
SPACE = KeySpace("model-a", LAYOUT)
salts = st.text(max_size=40)
token_lists = st.lists(st.integers(0, 2**31 - 1), min_size=16, max_size=80)


def tenant_keys(space: KeySpace, salt: str, ids: list[int]) -> list[bytes]:
    """What an engine publishes and a router looks up: the chain from the tenant's root."""
    return space.keys(salt, hash_blocks(ids, space.layout.block_size, root=root_hash(salt)))


@settings(max_examples=300, deadline=None)
@given(salts, salts, token_lists, token_lists)
def test_two_salts_never_share_a_key(a: str, b: str, ids_a: list[int], ids_b: list[int]) -> None:
    """Whatever either tenant sends, even the same tokens, no key of one is a key of the other."""
    if a == b:
        return
    assert SPACE.namespace(a) != SPACE.namespace(b)
    keys_a = set(tenant_keys(SPACE, a, ids_a))
    keys_b = set(tenant_keys(SPACE, b, ids_b)) | set(tenant_keys(SPACE, b, ids_a))
    assert not keys_a & keys_b


@settings(max_examples=100, deadline=None)
@given(salts, token_lists)
def test_same_salt_same_tokens_same_keys(salt: str, ids: list[int]) -> None:
    """A tenant's next turn finds its own blocks: keys are stable across calls and instances."""
    assert tenant_keys(SPACE, salt, ids) == tenant_keys(KeySpace("model-a", LAYOUT), salt, ids)
    chain = hash_blocks(ids, 16, root=root_hash(salt))
    for key, h in zip(tenant_keys(SPACE, salt, ids), chain, strict=True):
        assert len(key) == KEY_BYTES and chain_hash_of(key) == h
        assert 0 <= ring_point(key) < 2**64


@pytest.mark.parametrize(
    "other",
    [
        KeySpace("model-b", LAYOUT),
        KeySpace("model-a", replace(LAYOUT, dtype="bfloat16")),
        KeySpace("model-a", replace(LAYOUT, num_layers=5)),
        KeySpace("model-a", replace(LAYOUT, num_kv_heads=2)),
        KeySpace("model-a", replace(LAYOUT, head_dim=64)),
        KeySpace("model-a", replace(LAYOUT, block_size=32)),
        KeySpace("model-a", replace(LAYOUT, num_planes=1)),
    ],
)
def test_models_and_layouts_never_share_a_key(other: KeySpace) -> None:
    ids = list(range(3, 3 + 64))
    for salt in ("", "tenant"):
        assert not set(tenant_keys(SPACE, salt, ids)) & set(tenant_keys(other, salt, ids))


def test_field_boundaries_are_unambiguous() -> None:
    """Length prefixes: moving a character between the model id and the salt changes the key."""
    assert KeySpace("ab", LAYOUT).namespace("c") != KeySpace("a", LAYOUT).namespace("bc")


def test_layout_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="head_dim=0 is out of range"):
        KVLayout("float32", 1, 1, 0, 16)
    with pytest.raises(ValueError, match="model_id"):
        KeySpace("", LAYOUT)


def test_fingerprint_tells_weights_apart(tmp_path: Path) -> None:
    """Same config and header, other weights (another seed): another identity."""
    header = b'{"w":{"dtype":"F32","shape":[4096],"data_offsets":[0,16384]}}'
    for name, fill in (("a", b"\x01"), ("b", b"\x02"), ("c", b"\x01")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
        data = len(header).to_bytes(8, "little") + header + fill * 16384
        (d / "model.safetensors").write_bytes(data)
    a, b, c = (model_fingerprint(tmp_path / n) for n in "abc")
    assert a != b and a == c and len(a) == 32
