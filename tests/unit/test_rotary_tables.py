"""Rotary tables: they start at the context, double to cover later positions, stop at a cap."""

from __future__ import annotations

import pytest
import torch

from experts.layers import RotaryEmbedding

CPU = torch.device("cpu")


def rope(context: int = 512, limit: int | None = 4096) -> RotaryEmbedding:
    return RotaryEmbedding(16, 10_000.0, context, CPU, limit)


def test_tables_start_at_the_context() -> None:
    table = rope()
    assert table.max_positions == 512 and table.num_builds == 1
    assert table.cos.shape == table.sin.shape == (512, 16)


def test_tables_double_and_are_not_rebuilt_within_their_size() -> None:
    """Once rebuilt at the exact size on every step past them: count the rebuilds."""
    table = rope()
    sizes = []
    for position in range(512, 4096):  # one decode step at a time, past the context
        table.ensure(position + 1)
        sizes.append(table.max_positions)
    assert sorted(set(sizes)) == [1024, 2048, 4096]
    assert table.num_builds == 4  # 512 at start, then 1024, 2048 and 4096
    table.ensure(10)
    table.ensure(4096)
    assert table.num_builds == 4


def test_growth_stops_at_the_limit() -> None:
    table = rope(limit=3000)
    table.ensure(2049)  # 512 -> 4096 would pass the limit
    assert table.max_positions == 3000 and table.num_builds == 2
    table.ensure(3000)
    assert table.num_builds == 2
    with pytest.raises(AssertionError, match="past the rotary limit of 3000"):
        table.ensure(3001)
    assert table.max_positions == 3000


def test_one_jump_doubles_as_often_as_it_needs_to() -> None:
    table = rope()
    table.ensure(3000)
    assert table.max_positions == 4096 and table.num_builds == 2


def test_without_a_limit_the_tables_stay_at_the_context() -> None:
    table = rope(limit=None)
    assert table.limit == 512
    with pytest.raises(AssertionError, match="past the rotary limit"):
        table.ensure(513)


def test_grown_tables_extend_the_same_values() -> None:
    table = rope()
    cos, sin = table.cos.clone(), table.sin.clone()
    table.ensure(2000)
    assert torch.equal(table.cos[:512], cos) and torch.equal(table.sin[:512], sin)
    direct = rope(context=2048)
    assert torch.equal(table.cos, direct.cos) and torch.equal(table.sin, direct.sin)
