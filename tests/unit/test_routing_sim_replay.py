"""bench/routing_sim's queued-work figure replays each replica's LRU forward without copying
it: the replay must agree with a real LRU fed the same keys."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from bench.routing_sim import BS, Replica, Req, _lru_insert, _Replay


@pytest.mark.parametrize("seed", range(20))
def test_replay_matches_a_copied_lru(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(1, 12)
    cache: OrderedDict[bytes, None] = OrderedDict()
    _lru_insert(cache, [bytes([rng.randrange(30)]) for _ in range(20)], capacity)
    copy = cache.copy()
    replay = _Replay(cache, capacity)
    for _ in range(15):
        keys = [bytes([rng.randrange(30)]) for _ in range(rng.randint(1, 6))]
        expected = 0
        for key in keys:
            if key not in copy:
                break
            expected += 1
        assert replay.hit_blocks(keys) == expected
        _lru_insert(copy, keys, capacity)
        replay.insert(keys)
        assert {k for k in map(lambda i: bytes([i]), range(30)) if replay.holds(k)} == set(copy)
    assert len(cache) <= capacity  # the replica's own cache was not touched by the replay


def test_backlog_counts_blocks_computed_ahead_in_the_queue() -> None:
    """Two queued requests for one new document: the second finds it cached when it starts."""
    doc = [bytes([i]) for i in range(4)]
    rep = Replica("r0")
    rep.queue.extend([Req(0, doc, 4 * BS, 10), Req(1, doc, 4 * BS, 10)])
    assert rep.backlog(0.0, 1000.0, capacity=100) == (4 * BS + 10) + 10
    assert rep.backlog(0.0, 1000.0, capacity=3) == 2 * (4 * BS + 10)  # it cannot stay cached
