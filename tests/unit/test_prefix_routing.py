"""Prefix-aware routing without Ray or a model: the index follows KV events (gaps, restarts,
snapshots), the router picks the least work in tokens under a bounded imbalance, session ids
and prefixes steer, tenants never match each other; and the published text-affinity baseline."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.block_key import KeySpace, KVLayout
from cache.prefix_hash import hash_blocks, root_hash
from router.baseline_routers import PowerOfTwoRouter, TextAffinityRouter
from router.prefix_index import PrefixIndex
from router.prefix_router import PrefixRouter, PrefixRouterConfig

SPACE = KeySpace("m", KVLayout("float32", 1, 1, 4, 16))


@dataclass(frozen=True)
class Batch:
    epoch: str
    seq_no: int
    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    snapshot: bool = False


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys(n_blocks: int, start: int = 0, salt: str = "") -> list[bytes]:
    ids = list(range(start, start + 16 * n_blocks))
    return SPACE.keys(salt, hash_blocks(ids, 16, root=root_hash(salt)))


def test_index_matches_leading_blocks_per_replica() -> None:
    index = PrefixIndex()
    k = keys(6)
    index.apply("a", Batch("ea", 0, snapshot=True))
    index.apply("a", Batch("ea", 1, stored=tuple(k[:4])))
    index.apply("b", Batch("eb", 0, stored=tuple(k[:2]), snapshot=True))
    index.apply("c", Batch("ec", 0, stored=(k[1], k[2]), snapshot=True))  # no first block
    assert index.matches(k) == {"a": 4, "b": 2}  # c lacks the first block: absent
    index.apply("a", Batch("ea", 2, removed=(k[1],)))
    assert index.matches(k) == {"a": 1, "b": 2}
    assert index.matches(keys(3, start=999)) == {}


def test_index_resyncs_after_a_gap_and_clears_on_restart() -> None:
    index = PrefixIndex()
    k = keys(4)
    assert index.apply("a", Batch("e1", 0, snapshot=True))
    assert index.apply("a", Batch("e1", 1, stored=tuple(k[:2])))
    assert not index.apply("a", Batch("e1", 3, stored=(k[2],)))  # batch 2 was lost
    assert index.needs_snapshot("a") and index.matches(k)["a"] == 3  # stale but kept
    assert index.apply("a", Batch("e1", 4, stored=tuple(k), snapshot=True))
    assert not index.needs_snapshot("a") and index.matches(k)["a"] == 4
    # a restarted engine: a new epoch, its cache empty from its first batch on
    assert index.apply("a", Batch("e2", 0, snapshot=True))
    assert "a" not in index.matches(k) and index.num_keys("a") == 0
    # joining mid-stream of an epoch: keys applied, but a snapshot is wanted
    assert not index.apply("b", Batch("e9", 7, stored=(k[0],)))
    assert index.needs_snapshot("b")


def test_expected_blocks_count_until_they_expire() -> None:
    clock = Clock()
    index = PrefixIndex(expect_ttl_s=1.0, clock=clock)
    index.add_replica("a")
    index.add_replica("b")
    k = keys(3)
    index.expect("b", k)
    assert index.matches(k) == {"b": 3}
    clock.now = 2.0
    index.expire()  # (every event batch does this)
    assert index.matches(k) == {}


def test_a_removed_block_still_expected_counts_until_its_expectation_ends() -> None:
    clock = Clock()
    index = PrefixIndex(expect_ttl_s=1.0, clock=clock)
    k = keys(3)
    index.apply("a", Batch("e", 0, stored=tuple(k), snapshot=True))
    index.expect("a", k[1:])  # routed there again: it will compute what it may evict
    index.apply("a", Batch("e", 1, removed=tuple(k[1:])))
    assert index.matches(k) == {"a": 3}
    clock.now = 2.0
    index.expire()
    assert index.matches(k) == {"a": 1}
    index.remove_replica("a")
    assert index.matches(k) == {}


def test_many_replicas_dropping_at_one_block_are_each_credited() -> None:
    """A shared system prompt's holders (more than ``CREDIT_SCAN`` of them) all end at its
    last block; one goes on with its session's blocks."""
    index = PrefixIndex()
    k = keys(8)
    for i in range(20):
        held = k if i == 7 else k[:3]
        index.apply(f"r{i}", Batch("e", 0, stored=tuple(held), snapshot=True))
    index.remove_replica("r3")
    want = {f"r{i}": 3 for i in range(20) if i != 3} | {"r7": 8}
    assert index.matches(k) == want


def router(n: int = 3, **config: float) -> PrefixRouter:
    r = PrefixRouter(PrefixIndex(), PrefixRouterConfig(block_size=16, **config))  # type: ignore[arg-type]
    for i in range(n):
        r.add_replica(f"r{i}")
    return r


def test_router_goes_where_the_prefix_is_until_the_imbalance_bound() -> None:
    r = router(slack_tokens=500, imbalance_factor=1.5)
    k = keys(20)  # a 320-token prefix cached on r1
    r.index.apply("r1", Batch("e", 0, stored=tuple(k), snapshot=True))
    choice = r.choose(k, 330, max_new_tokens=10)
    assert choice.replica == "r1" and choice.cached_tokens == 320 and choice.reason == "prefix"
    assert choice.work_tokens == 330 - 320 + 10
    # r1 gets busy: its cost (queued tokens) passes the bound, the request goes elsewhere
    r.queued["r1"] = 5000
    other = r.choose(k, 330)
    assert other.replica != "r1" and other.best_elsewhere == 320 and other.reason == "balance"
    r.done(choice)
    assert r.queued["r1"] == 5000 - choice.work_tokens


def test_only_the_callers_candidates_are_chosen() -> None:
    """A replica that died is still in the index (and the queue) until its removal is seen;
    given the live candidates' loads, the router never picks it, holder of the prefix or not
    (Serve's request router would fail the request with a KeyError)."""
    r = router(3, slack_tokens=10_000)
    k = keys(10)
    r.index.apply("r0", Batch("e", 0, stored=tuple(k), snapshot=True))  # r0 holds it all
    r.queued.update({"r0": 0.0, "r1": 50.0, "r2": 10.0})
    assert r.choose(k, 170).replica == "r0"
    for i in range(5):  # r0 is gone: only r1 and r2 are candidates
        choice = r.choose(k, 170, loads={"r1": r.queued["r1"], "r2": r.queued["r2"]})
        assert choice.replica in {"r1", "r2"}
        if i == 0:  # nor is r0's cache a miss "routed elsewhere"
            assert choice.best_elsewhere == 0 and choice.reason != "prefix"


def test_cost_is_one_unit_uncached_plus_queued() -> None:
    r = router(2, slack_tokens=10_000)
    k = keys(10)  # 160 tokens
    r.index.apply("r0", Batch("e", 0, stored=tuple(k), snapshot=True))
    r.queued.update({"r0": 300.0, "r1": 0.0})
    # r0: 170 - 160 + 300 = 310 ; r1: 170 + 0 = 170 -> r1
    assert r.choose(k, 170).replica == "r1"
    r = router(2, slack_tokens=10_000)  # (r1 now counts as holding it: it was routed there)
    r.index.apply("r0", Batch("e", 0, stored=tuple(k), snapshot=True))
    r.queued.update({"r0": 100.0, "r1": 0.0})
    assert r.choose(k, 170).replica == "r0"  # 110 < 170


def test_sessions_and_new_prefixes_stick_before_any_event() -> None:
    r = router(4, slack_tokens=100_000)
    first = r.choose(keys(5, start=40), 90, session_id="s1")
    r.done(first)
    # the next turn's prompt starts with the first: routed blocks count as held
    turn2 = r.choose(keys(8, start=40), 140, session_id="s1")
    assert turn2.replica == first.replica and turn2.cached_tokens == 80
    # requests sharing a new system prompt land where its first one went ...
    sys_prompt = keys(10, start=5000)
    one = r.choose(sys_prompt, 170)
    r.done(one)
    assert r.choose(sys_prompt, 170).replica == one.replica
    # ... unless waiting there costs more than computing it elsewhere (10 + 200 queued > 170)
    r.queued[one.replica] = 200
    assert r.choose(sys_prompt, 170).replica != one.replica
    # with nothing cached anywhere and equal queues, a session id breaks the tie the same way
    fresh = [router(4) for _ in range(2)]
    assert len({f.choose(keys(3, start=777), 50, session_id="s9").replica for f in fresh}) == 1


def test_tenants_never_match_each_other() -> None:
    r = router(2, slack_tokens=100_000)
    a = keys(10, salt="tenant-a")
    r.index.apply("r0", Batch("e", 0, stored=tuple(a), snapshot=True))
    other = r.choose(keys(10, salt="tenant-b"), 170)
    assert other.cached_tokens == 0 and other.best_elsewhere == 0
    r.done(other)
    assert r.choose(a, 170).cached_tokens == 160


def test_router_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"imbalance_factor=0\.5"):
        PrefixRouterConfig(imbalance_factor=0.5)


def test_power_of_two_prefers_the_less_loaded() -> None:
    p = PowerOfTwoRouter(["a", "b"])
    assert {p.choose({"a": 5, "b": 0}) for _ in range(20)} == {"b"}


def test_text_affinity_follows_the_published_rule() -> None:
    t = TextAffinityRouter(["a", "b", "c"], granularity=1)
    first = t.choose("hello there, a long system prompt")
    # balanced queues and a match >= 10%: the replica that got the prefix
    assert t.choose("hello there, a long system prompt and more") == first
    # imbalanced (difference >= 10): power of two over every replica, ignoring the match
    loads = {first: 50, **{r: 0 for r in t.replicas if r != first}}
    assert {t.choose("hello there, a long system prompt!", loads) for _ in range(10)} != {first}
    # no match: a replica with the smallest tree
    other = t.choose("zzzz completely different")
    assert other != first


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["store", "remove", "expect", "tick", "restart", "leave"]),
            st.integers(0, 11),
            st.one_of(
                st.lists(st.integers(0, 39), max_size=6),
                st.integers(0, 40).map(lambda n: list(range(n))),  # a prefix, long chains
            ),
        ),
        max_size=40,
    )
)
def test_matches_equal_a_brute_force_walk(ops: list[tuple[str, int, list[int]]]) -> None:
    """Whatever the events, expectations, expiries and replicas leaving (their bit reused),
    each replica's match is the number of leading keys it holds or is expected to hold
    (checked against a plain walk). Twelve replicas: many credited at once take a pass of
    their own (``CREDIT_SCAN``)."""
    clock = Clock()
    index = PrefixIndex(expect_ttl_s=1.0, clock=clock, exact=True)
    pool = keys(40)
    held: dict[str, set[bytes]] = {f"r{i}": set() for i in range(12)}
    expected: dict[str, list[tuple[float, set[bytes]]]] = {r: [] for r in held}
    seq = dict.fromkeys(held, 0)
    epoch = dict.fromkeys(held, "e0")
    for r in held:
        index.apply(r, Batch("e0", 0, snapshot=True))
        seq[r] = 1
    for op, who, picks in ops:
        r = f"r{who}"
        chosen = {pool[i] for i in picks}
        if op in ("store", "remove"):
            stored = tuple(chosen) if op == "store" else ()
            removed = tuple(chosen) if op == "remove" else ()
            index.apply(r, Batch(epoch[r], seq[r], stored, removed))
            seq[r] += 1
            held[r] = held[r] | chosen if op == "store" else held[r] - chosen
        elif op == "expect":
            index.expect(r, [pool[i] for i in picks])
            expected[r].append((clock.now + 1.0, chosen))
        elif op == "tick":
            clock.now += 0.6
            index.expire()
        else:
            if op == "leave":  # removed, then back (a new replica on the freed bit)
                index.remove_replica(r)
                expected[r] = []
            epoch[r] += "x"
            index.apply(r, Batch(epoch[r], 0, snapshot=True))
            seq[r], held[r] = 1, set()
        for start in (0, 3, 20):
            want = {}
            for name in held:
                live = set(held[name])
                for until, ks in expected[name]:
                    if until > clock.now:
                        live |= ks
                n = 0
                for key in pool[start:]:
                    if key not in live:
                        break
                    n += 1
                if n:
                    want[name] = n
            assert index.matches(pool[start:]) == want


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 60)), max_size=12), st.integers(0, 60))
def test_bisection_equals_the_walk_when_replicas_hold_prefixes(
    holdings: list[tuple[int, int]], length: int
) -> None:
    """Replicas holding prefixes of the chain (what engines free tail first leave): the
    default lookup, which bisects once few replicas are left, finds what the walk finds."""
    pool = keys(60)
    fast, exact = PrefixIndex(), PrefixIndex(exact=True)
    for index in (fast, exact):
        for i in range(10):
            index.apply(f"r{i}", Batch("e", 0, snapshot=True))
        for seq, (who, n) in enumerate(holdings, start=1):
            index.apply(f"r{who}", Batch("e", seq, stored=tuple(pool[:n])))
    assert fast.matches(pool[:length]) == exact.matches(pool[:length])
