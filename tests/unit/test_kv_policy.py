"""KV retention policies: validation, protected blocks, window eviction, smallest window."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from cache.kv_policy import (
    KV_POLICIES,
    MAX_ANCHORS,
    MAX_POSITIONS,
    WINDOW_CONTEXT_FACTOR,
    KVPolicy,
    window_position_limit,
)

BS = 4


# --- validation -------------------------------------------------------------------------------


def test_unknown_kind_lists_the_known_ones() -> None:
    assert KV_POLICIES == ("full", "window")
    with pytest.raises(ValueError, match=r"^kv_policy 'sliding' is unknown; known: full, window$"):
        KVPolicy("sliding")


def test_defaults_are_full_and_valid() -> None:
    policy = KVPolicy()
    assert policy.kind == "full" and not policy.is_window
    assert KVPolicy("window", window=8).is_window


@pytest.mark.parametrize("window", [0, -1, -16])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(ValueError, match=rf"^window={window} must be > 0 for kv_policy 'window'$"):
        KVPolicy("window", window=window)


def test_negative_sinks_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^sinks=-1 must be >= 0$"):
        KVPolicy("window", window=8, sinks=-1)


@pytest.mark.parametrize(("start", "end"), [(5, 5), (6, 2), (-1, 3), (0, 0)])
def test_malformed_anchor_spans_are_refused(start: int, end: int) -> None:
    message = rf"^anchor span \[{start}, {end}\) must satisfy 0 <= start < end$"
    with pytest.raises(ValueError, match=message):
        KVPolicy("window", window=16, anchors=((0, 4), (start, end)))


def test_well_formed_anchor_spans_are_accepted() -> None:
    policy = KVPolicy("window", window=16, sinks=0, anchors=((0, 1), (7, 30)))
    assert policy.anchors == ((0, 1), (7, 30))


@pytest.mark.parametrize(
    "kwargs",
    [{"window": 8}, {"sinks": 1}, {"anchors": ((0, 4),)}, {"window": 8, "sinks": 2}],
)
def test_window_arguments_are_refused_with_full(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"apply only to kv_policy 'window'$") as info:
        KVPolicy("full", **kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        shown = list(value) if isinstance(value, tuple) else value
        assert f"{name}={shown}" in str(info.value)


def test_unknown_kind_message_does_not_echo_a_long_name() -> None:
    with pytest.raises(ValueError, match=r"^kv_policy 'xxxx") as info:
        KVPolicy("x" * 100_000)
    assert len(str(info.value)) < 100


# --- hard bounds: whatever the model, no span makes a policy costly ------------------------------


def test_too_many_anchors_are_refused_by_count() -> None:
    """10k anchors were accepted; the message names the count and the limit, not the list."""
    anchors = tuple((i, i + 1) for i in range(10_000))
    with pytest.raises(ValueError, match=r"^anchors: 10000 spans is too many: allowed at most 64$"):
        KVPolicy("window", window=64, anchors=anchors)
    assert MAX_ANCHORS == 64


def test_anchor_count_is_checked_before_the_kind_specific_rules() -> None:
    """A ``full`` policy with 10k anchors once quoted them all in its message."""
    anchors = tuple((i, i + 1) for i in range(10_000))
    with pytest.raises(ValueError, match=r"10000 spans is too many") as info:
        KVPolicy("full", anchors=anchors)
    assert len(str(info.value)) < 100


def test_as_many_anchors_as_allowed_are_accepted() -> None:
    anchors = tuple((2 * i, 2 * i + 1) for i in range(MAX_ANCHORS))
    assert len(KVPolicy("window", window=64, anchors=anchors).anchors) == MAX_ANCHORS


def test_full_policy_message_quotes_a_few_anchors_only() -> None:
    anchors = tuple((i, i + 1) for i in range(MAX_ANCHORS))
    with pytest.raises(
        ValueError, match=r"anchors=64 spans, first \[\(0, 1\), \(1, 2\), \(2, 3\)\]"
    ):
        KVPolicy("full", anchors=anchors)


@pytest.mark.parametrize("sinks", [MAX_POSITIONS + 1, 2**31, 2**32 - 1])
def test_huge_sinks_are_refused(sinks: int) -> None:
    message = rf"^sinks={sinks} is out of range: allowed \[0, {MAX_POSITIONS}\]$"
    with pytest.raises(ValueError, match=message):
        KVPolicy("window", window=64, sinks=sinks)


@pytest.mark.parametrize("window", [MAX_POSITIONS + 1, 2**32 - 1])
def test_huge_windows_are_refused(window: int) -> None:
    with pytest.raises(
        ValueError, match=rf"^window={window} is out of range: allowed \[1, {MAX_POSITIONS}\]$"
    ):
        KVPolicy("window", window=window)


@pytest.mark.parametrize(("start", "end"), [(0, MAX_POSITIONS + 1), (2**32 - 2, 2**32 - 1)])
def test_anchors_ending_past_every_position_are_refused(start: int, end: int) -> None:
    message = (
        rf"^anchor span \[{start}, {end}\) ends past position {MAX_POSITIONS}, which no sequence"
    )
    with pytest.raises(ValueError, match=message):
        KVPolicy("window", window=64, anchors=((0, 4), (start, end)))


def test_bounds_themselves_are_accepted() -> None:
    policy = KVPolicy(
        "window", window=MAX_POSITIONS, sinks=MAX_POSITIONS, anchors=((0, MAX_POSITIONS),)
    )
    assert policy.min_window(1) == (MAX_POSITIONS + 2) * 1


def test_pinned_computations_do_not_grow_with_the_spans() -> None:
    """Every pinned block once went into a set: 1M sinks at block size 1 held 1M ints. Merged
    intervals need memory for the spans only (measured as allocations, not time)."""
    anchors = tuple((i * 16_384, i * 16_384 + 16_000) for i in range(MAX_ANCHORS))
    policy = KVPolicy("window", window=64, sinks=MAX_POSITIONS, anchors=anchors)
    tracemalloc.start()
    try:
        least = policy.min_window(1)
        pinned = [policy.protected(b, 1) for b in (0, MAX_POSITIONS - 1, MAX_POSITIONS)]
        drop = policy.blocks_to_evict([0, 1, MAX_POSITIONS, MAX_POSITIONS + 1], 10**9, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert least == (MAX_POSITIONS + 2) * 1
    assert pinned == [True, True, False]
    assert drop == [2]
    assert peak < 64 * 1024, f"{peak} bytes allocated"


@pytest.mark.parametrize(
    ("context", "limit"),
    [
        (512, 512 * WINDOW_CONTEXT_FACTOR),
        (4096, 32_768),
        (MAX_POSITIONS // WINDOW_CONTEXT_FACTOR, MAX_POSITIONS),
        (MAX_POSITIONS // 2, MAX_POSITIONS),  # capped
        (2 * MAX_POSITIONS, 2 * MAX_POSITIONS),  # never below the context itself
    ],
)
def test_window_position_limit(context: int, limit: int) -> None:
    assert WINDOW_CONTEXT_FACTOR == 8 and MAX_POSITIONS == 2**20
    assert window_position_limit(context) == limit


# --- protected blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sinks", "expected"),
    [
        (0, [False, False, False]),
        (1, [True, False, False]),
        (4, [True, False, False]),  # block 1 starts at token 4: not a sink
        (5, [True, True, False]),
        (8, [True, True, False]),
        (9, [True, True, True]),
    ],
)
def test_sinks_protect_the_blocks_that_hold_them(sinks: int, expected: list[bool]) -> None:
    policy = KVPolicy("window", window=64, sinks=sinks)
    assert [policy.protected(b, BS) for b in range(3)] == expected


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ((6, 9), [False, True, True, False]),  # straddles blocks 1 and 2
        ((4, 8), [False, True, False, False]),  # exactly block 1: end is exclusive
        ((8, 9), [False, False, True, False]),  # starts at block 2's first token
        ((3, 4), [True, False, False, False]),  # last token of block 0 only
        ((0, 16), [True, True, True, True]),
        ((15, 16), [False, False, False, True]),
    ],
)
def test_anchors_protect_every_block_they_overlap(
    span: tuple[int, int], expected: list[bool]
) -> None:
    policy = KVPolicy("window", window=64, anchors=(span,))
    assert [policy.protected(b, BS) for b in range(4)] == expected


def test_protection_is_the_union_of_sinks_and_anchors() -> None:
    policy = KVPolicy("window", window=64, sinks=2, anchors=((9, 10), (20, 22)))
    assert [b for b in range(8) if policy.protected(b, BS)] == [0, 2, 5]


def test_full_policy_protects_nothing_and_evicts_nothing() -> None:
    policy = KVPolicy()
    assert not any(policy.protected(b, BS) for b in range(4))
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 1000, BS) == []


# --- eviction -----------------------------------------------------------------------------------


def test_evicts_oldest_blocks_until_within_the_window() -> None:
    policy = KVPolicy("window", window=8)
    # 4 full blocks and 2 keys in the last: 18 keys
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 18, BS) == [0, 1, 2]  # 18 -> 6
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 20, BS) == [0, 1, 2]  # 20 -> 8
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 17, BS) == [0, 1, 2]  # 17 -> 5
    assert policy.blocks_to_evict([0, 1, 2], 9, BS) == [0]  # 9 -> 5


def test_nothing_is_evicted_within_the_window() -> None:
    policy = KVPolicy("window", window=8)
    assert policy.blocks_to_evict([0, 1], 8, BS) == []
    assert policy.blocks_to_evict([0, 1], 5, BS) == []
    assert policy.blocks_to_evict([0], 4, BS) == []


def test_sink_blocks_are_skipped() -> None:
    policy = KVPolicy("window", window=8, sinks=2)
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 18, BS) == [1, 2, 3]


def test_anchor_blocks_in_the_middle_are_skipped() -> None:
    policy = KVPolicy("window", window=8, anchors=((8, 12),))
    assert policy.blocks_to_evict([0, 1, 2, 3, 4], 18, BS) == [0, 1, 3]


def test_returns_table_indices_not_logical_block_numbers() -> None:
    # blocks 1 and 2 were dropped earlier; block 0 holds the sink
    policy = KVPolicy("window", window=8, sinks=1)
    table = [0, 3, 4, 5]  # 3 full blocks + 3 keys in block 5: 15 keys
    assert policy.blocks_to_evict(table, 15, BS) == [1, 2]


def test_the_last_block_is_never_evicted() -> None:
    policy = KVPolicy("window", window=4)
    # only one full block may go even though 8 keys > window 4 would want both gone
    assert policy.blocks_to_evict([0, 1], 8, BS) == [0]
    assert policy.blocks_to_evict([7], 4 * 10, BS) == []
    # with the only full block protected, nothing can go
    assert KVPolicy("window", window=4, sinks=1).blocks_to_evict([0, 1], 8, BS) == []


def test_windowed_growth_stays_within_the_window_and_keeps_protected_blocks() -> None:
    """Grow token by token, evicting as the engine does; check every step."""
    rng = random.Random(7)
    for _ in range(40):
        sinks = rng.randint(0, 6)
        anchors = tuple(
            (start, start + rng.randint(1, 6))
            for start in sorted(rng.sample(range(40), rng.randint(0, 2)))
        )
        base = KVPolicy("window", window=1, sinks=sinks, anchors=anchors)
        window = base.min_window(BS) + rng.randint(0, 12)
        policy = KVPolicy("window", window=window, sinks=sinks, anchors=anchors)
        logical: list[int] = []
        num_computed = num_dropped = 0
        for _step in range(120):
            if num_computed % BS == 0:
                logical.append(num_computed // BS)
            num_computed += 1
            num_keys = num_computed - num_dropped
            drop = policy.blocks_to_evict(logical, num_keys, BS)
            assert len(drop) == len(set(drop)) and drop == sorted(drop)
            assert len(logical) - 1 not in drop
            assert not any(policy.protected(logical[i], BS) for i in drop)
            logical = [b for i, b in enumerate(logical) if i not in drop]
            num_dropped += len(drop) * BS
            num_keys = num_computed - num_dropped
            assert num_keys <= window, (policy, num_computed)
            assert num_keys == (len(logical) - 1) * BS + (num_computed - 1) % BS + 1
            current = (num_computed - 1) // BS
            expected_kept = {b for b in range(current + 1) if policy.protected(b, BS)}
            assert expected_kept | {current} <= set(logical)


# --- smallest workable window --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sinks", "anchors", "expected_blocks"),
    [
        (0, (), 2),
        (1, (), 3),
        (4, (), 3),
        (5, (), 4),
        (0, ((6, 9),), 4),  # anchor spans blocks 1 and 2
        (0, ((4, 8),), 3),  # exactly block 1
        (4, ((2, 5),), 4),  # sinks {0} and anchor {0, 1} overlap: 2 pinned
        (1, ((20, 21),), 4),  # {0} and {5}
        (0, ((0, 2), (1, 3)), 3),  # overlapping anchors pin block 0 once
    ],
)
def test_min_window_counts_pinned_blocks_plus_two(
    sinks: int, anchors: tuple[tuple[int, int], ...], expected_blocks: int
) -> None:
    policy = KVPolicy("window", window=1, sinks=sinks, anchors=anchors)
    assert policy.min_window(BS) == expected_blocks * BS


# --- merged intervals against the per-block sets they replaced -----------------------------------


def _pinned_blocks_by_set(policy: KVPolicy, block_size: int) -> set[int]:
    """The original rule: every block of the sinks and of each anchor, one by one."""
    pinned = set(range(-(-policy.sinks // block_size)))
    for start, end in policy.anchors:
        pinned.update(range(start // block_size, -(-end // block_size)))
    return pinned


def _protected_by_scan(policy: KVPolicy, block: int, block_size: int) -> bool:
    lo, hi = block * block_size, (block + 1) * block_size
    return lo < policy.sinks or any(s < hi and lo < e for s, e in policy.anchors)


def test_merged_intervals_agree_with_the_set_based_rule() -> None:
    rng = random.Random(13)
    for _ in range(2_000):
        block_size = rng.choice([1, 2, 3, 4, 16])
        sinks = rng.choice([0, 0, rng.randint(1, 40)])
        anchors = []
        for _span in range(rng.randint(0, 8)):
            start = rng.randint(0, 80)
            anchors.append((start, start + rng.randint(1, 20)))
        policy = KVPolicy("window", window=1, sinks=sinks, anchors=tuple(anchors))
        pinned = _pinned_blocks_by_set(policy, block_size)
        assert policy.min_window(block_size) == (len(pinned) + 2) * block_size, policy
        for block in range(110 // block_size + 2):
            want = _protected_by_scan(policy, block, block_size)
            assert want == (block in pinned)
            assert policy.protected(block, block_size) == want, (policy, block_size, block)
