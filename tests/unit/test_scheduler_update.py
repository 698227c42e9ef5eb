"""The scheduler's side of a step after the model ran (``Scheduler.update``): computed tokens,
full blocks named for reuse, sampled tokens, finishes on stop, end-of-sequence or length,
and failed rows left for the engine to finish."""

from __future__ import annotations

from cache.block_manager import BlockManager
from cache.kv_policy import KVPolicy
from cluster.engine.scheduler import Scheduler, SchedulerConfig
from cluster.engine.sequence import Sequence, SequenceStatus
from experts.sampling_params import SamplingParams
from tests.scheduler_harness import BS, FakeClock, Harness, check_state, make_seq

EOS = 2


def test_update_books_the_computed_tokens_and_names_full_blocks() -> None:
    h = Harness(num_blocks=16)
    seq = make_seq("a", list(range(10, 19)), max_tokens=3)  # 9 tokens: 2 full blocks + 1
    h.add(seq)
    h.clock.now = 1500.0
    out = h.sched.schedule()
    assert seq.first_scheduled_time == 1500.0
    h.clock.now = 1501.0
    h.sched.update(out, {0: 77}, failed=())
    assert (seq.num_computed, seq.output_ids, seq.first_token_time) == (9, [77], 1501.0)
    assert len(seq.block_hashes) == 2 and h.blocks.num_cached == 2
    assert h.blocks.match_prefix(seq.prompt_ids, 2)[0] == seq.block_table[:2]
    assert h.sched.num_prompt_tokens_computed == 9
    out = h.sched.schedule()  # the decode step: its output token is not a prompt token
    h.clock.now = 1600.0
    h.sched.update(out, {0: 78}, failed=())
    assert seq.first_scheduled_time == 1500.0 and seq.first_token_time == 1501.0
    assert seq.num_computed == 10 and h.sched.num_prompt_tokens_computed == 9


def test_a_failed_row_is_left_as_it_was_for_the_engine_to_finish() -> None:
    h = Harness(num_blocks=16)
    bad, good = make_seq("bad", list(range(8))), make_seq("good", list(range(8)))
    h.add(bad, good)
    out = h.sched.schedule()
    for chunk in out.chunks:
        h.compute(chunk)
    h.sched.update(out, {1: 5}, failed={0})
    assert (bad.num_computed, bad.output_ids, bad.block_hashes) == (0, [], [])
    assert bad.status is SequenceStatus.RUNNING
    assert (good.num_computed, good.output_ids, len(good.block_hashes)) == (8, [5], 2)
    h.sched.finish(bad, "error")
    assert bad.block_table == [] and h.sched.running == [good]
    check_state(h)


def _scheduler(eos: tuple[int, ...]) -> Scheduler:
    return Scheduler(SchedulerConfig(), BlockManager(16, BS), FakeClock(), eos)


def _seq(request_id: str, params: SamplingParams) -> Sequence:
    return Sequence(request_id, [5, 6, 7], params, KVPolicy(), 0.0)


def test_stop_tokens_end_of_sequence_and_max_tokens_finish_a_sequence() -> None:
    sched = _scheduler((EOS,))
    seqs = [
        _seq("eos", SamplingParams(max_tokens=9)),
        _seq("ignores", SamplingParams(max_tokens=9, ignore_eos=True)),
        _seq("stop", SamplingParams(max_tokens=9, stop_token_ids=(40,), ignore_eos=True)),
        _seq("length", SamplingParams(max_tokens=1)),
    ]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    sched.update(out, {0: EOS, 1: EOS, 2: 40, 3: 41}, failed=())
    assert [s.finish_reason for s in seqs] == ["stop", None, "stop", "length"]
    assert sched.running == [seqs[1]] and sched.blocks.num_held == 1
