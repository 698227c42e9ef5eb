"""Partial tail reuse on a real model: a multi-turn conversation's next turn copies the cached
K/V of the previous turn's partly filled last block instead of recomputing it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from cache.kv_pool import KVPool
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.unit.kv_checks import check_partition

BS = 16


@pytest.fixture(scope="module")
def model(shared_checkpoint: BuildCheckpoint) -> MoEModel:
    path = shared_checkpoint("mixtral", seed=3)
    return MoEModel.from_checkpoint(path)


@dataclass
class Conversations:
    """Every conversation's turn t is submitted together and run to completion, then t+1."""

    messages: list[list[list[int]]]  # [conversation][turn] new tokens
    replies: list[list[int]]  # [conversation][turn] reply length
    prompts: dict[str, list[int]] = field(default_factory=dict)
    events: dict[str, list[TokenEvent]] = field(default_factory=dict)
    computed: list[int] = field(default_factory=list)  # prompt tokens computed per turn

    def run(self, engine: LLMEngine) -> Conversations:
        history: list[list[int]] = [[] for _ in self.messages]
        for turn in range(len(self.messages[0])):
            before = engine.num_prompt_tokens_computed
            for conv, messages in enumerate(self.messages):
                request_id = f"c{conv}t{turn}"
                self.prompts[request_id] = history[conv] + messages[turn]
                self.events[request_id] = []
                params = SamplingParams(max_tokens=self.replies[conv][turn], ignore_eos=True)
                engine.add_request(EngineRequest(request_id, self.prompts[request_id], params))
            while engine.has_unfinished():
                for event in engine.step():
                    self.events[event.request_id].append(event)
            for conv in range(len(self.messages)):
                request_id = f"c{conv}t{turn}"
                history[conv] = self.prompts[request_id] + self.tokens(request_id)
            self.computed.append(engine.num_prompt_tokens_computed - before)
            assert engine.blocks.num_held == 0, "blocks leaked"
            check_partition(engine.blocks)
        return self

    def tokens(self, request_id: str) -> list[int]:
        return [e.token_id for e in self.events[request_id]]

    def logprobs(self, request_id: str) -> torch.Tensor:
        return torch.tensor([e.logprob for e in self.events[request_id]])

    def ideal(self, turn: int) -> int:
        """A token-granular cache computes each new message, plus (after the first turn) the
        previous reply's last token, which was sampled but never fed back."""
        return sum(len(m[turn]) + (turn > 0) for m in self.messages)


def conversations(seed: int, turns: int, count: int) -> Conversations:
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    messages = [
        [torch.randint(3, 256, (randint(1, 24),), generator=gen).tolist() for _ in range(turns)]
        for _ in range(count)
    ]
    replies = [[randint(1, 12) for _ in range(turns)] for _ in range(count)]
    return Conversations(messages, replies)


def assert_same_replies(warm: Conversations, cold: Conversations) -> None:
    for request_id in cold.events:
        assert warm.tokens(request_id) == cold.tokens(request_id), request_id
        # copied K/V in a wrong slot or layer would move the logprobs far more than this
        torch.testing.assert_close(
            warm.logprobs(request_id), cold.logprobs(request_id), atol=1e-4, rtol=0
        )


def test_a_conversation_computes_only_its_new_tokens_with_identical_replies(
    model: MoEModel,
) -> None:
    # messages and replies chosen so the computed history ends at many slots of its block,
    # including a block boundary (no partial tail: full blocks alone cover it)
    messages = [[5 + i for i in range(n)] for n in (21, 9, 30, 3, 14, 1, 7)]
    replies = [7, 12, 5, 16, 9, 2, 4]
    warm = Conversations([messages], [replies]).run(LLMEngine(model, EngineConfig(num_blocks=32)))
    off = EngineConfig(num_blocks=32, enable_prefix_caching=False)
    cold = Conversations([messages], [replies]).run(LLMEngine(model, off))
    assert_same_replies(warm, cold)
    tails = []
    for turn in range(1, len(messages)):
        prompt = warm.prompts[f"c0t{turn}"]
        first = warm.events[f"c0t{turn}"][0]
        assert first.num_prompt_tokens == len(prompt)
        assert first.num_cached_prompt_tokens == len(prompt) - len(messages[turn]) - 1
        assert warm.computed[turn] == len(messages[turn]) + 1
        tails.append(first.num_cached_prompt_tokens % BS)
        assert cold.computed[turn] == len(prompt)
    assert 0 in tails and len(set(tails)) >= 4, tails  # boundaries and several tail sizes
    assert warm.computed[0] == cold.computed[0] == len(messages[0])


def test_concurrent_conversations_with_chunked_prefill_and_queueing(model: MoEModel) -> None:
    convs = conversations(seed=1, turns=4, count=4)
    batching = {"max_num_batched_tokens": 24, "max_num_seqs": 3}
    warm_engine = LLMEngine(model, EngineConfig(num_blocks=80, **batching))
    warm = Conversations(convs.messages, convs.replies).run(warm_engine)
    off = EngineConfig(num_blocks=80, enable_prefix_caching=False, **batching)
    cold = Conversations(convs.messages, convs.replies).run(LLMEngine(model, off))
    assert_same_replies(warm, cold)
    assert warm.computed == [warm.ideal(t) for t in range(4)]
    assert warm_engine.blocks.num_evictions == 0 and warm_engine.scheduler.num_preemptions == 0
    assert warm_engine.blocks.num_cached_partial > 0
    reused = sum(e[0].num_cached_prompt_tokens for e in warm.events.values())
    assert reused == sum(cold.computed) - sum(warm.computed)


@pytest.mark.parametrize(
    ("num_blocks", "preempts"),
    [(16, False), (9, True)],  # a pool that evicts cached tails; one that also preempts
)
def test_a_small_pool_evicts_tails_and_preempts_with_identical_replies(
    model: MoEModel, num_blocks: int, preempts: bool
) -> None:
    convs = conversations(seed=2, turns=4, count=4)
    engine = LLMEngine(model, EngineConfig(num_blocks=num_blocks, max_num_batched_tokens=64))
    warm = Conversations(convs.messages, convs.replies).run(engine)
    off = EngineConfig(num_blocks=num_blocks, enable_prefix_caching=False)
    cold = Conversations(convs.messages, convs.replies).run(LLMEngine(model, off))
    assert_same_replies(warm, cold)
    assert engine.blocks.num_evictions > 0
    assert (engine.scheduler.num_preemptions > 0) == preempts
    ideal = sum(warm.ideal(t) for t in range(4))
    assert ideal < sum(warm.computed) < sum(cold.computed)


def test_copy_slots_copies_keys_and_values_of_every_layer() -> None:
    pool = KVPool(num_layers=3, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=5)
    pool._data.copy_(torch.randn_like(pool._data))
    before = pool._data.clone()
    pool.copy_slots(2, 0, 3)
    for layer in range(3):
        for kv in (pool.key(layer), pool.value(layer)):
            assert torch.equal(kv[0:3], kv[8:11])
    changed = (pool._data != before).flatten(3).any(-1)  # [L, 2, S]
    assert changed[:, :, 0:3].all() and not changed[:, :, 3:].any()
    pool.copy_slots(1, 1, 4)  # onto itself: nothing to do
    with pytest.raises(ValueError, match=r"count=0 must be in \[1, 4\]"):
        pool.copy_slots(2, 0, 0)
    with pytest.raises(ValueError, match=r"block 4 is outside the pool \[0, 4\)"):
        pool.copy_slots(4, 0, 1)
