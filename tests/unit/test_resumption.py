"""Resuming a request from token k: the sampler draws what the original would have, and an
engine given the first k tokens as ``resume_ids`` goes on exactly as the unsplit run did
(tokens, text at the boundary, finish, usage), for greedy and seeded sampled requests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from tokenizers import Tokenizer

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling import Sampler, draw_seed, sample_batch
from experts.sampling_params import SamplingParams
from experts.tokenizer import IncrementalDetokenizer
from tests.checkpoints import build_family_checkpoint
from tests.engine_runs import run_to_end

PROMPT_LENGTHS = (9, 30, 17)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MoEModel:
    path = build_family_checkpoint("mixtral", tmp_path_factory.mktemp("resume") / "m", seed=4)
    return MoEModel.from_checkpoint(path)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from deploy.demo_model import demo_tokenizer

    found: Tokenizer = demo_tokenizer()
    return found


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


# --- the sampler -------------------------------------------------------------------------------


def test_each_draw_depends_only_on_the_seed_and_the_token_index() -> None:
    logits = _logits(12, seed=1)
    params = SamplingParams(temperature=1.0, seed=123)
    whole = Sampler(params)
    drawn = [whole.pick(row) for row in logits]
    for k in (1, 5, 11):
        resumed = Sampler(params)  # a new replica: nothing drawn before token k
        assert [resumed.pick(logits[i], i) for i in range(k, 12)] == drawn[k:]
    assert len(set(drawn)) > 3, f"draws look constant: {drawn}"
    other = Sampler(SamplingParams(temperature=1.0, seed=124))
    assert [other.pick(row) for row in logits] != drawn


def test_draw_seeds_differ_across_tokens_and_requests() -> None:
    seeds = {draw_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**63 for s in seeds)


def test_batch_indices_keep_rows_independent_of_their_batch_mates() -> None:
    logits = _logits(3, seed=2)
    a = SamplingParams(temperature=0.8, seed=7)
    b = SamplingParams(temperature=0.8, seed=9)
    together = sample_batch(logits, [Sampler(a), Sampler(b), Sampler(a)], [4, 0, 4])
    alone = sample_batch(logits[[0]], [Sampler(a)], [4])
    assert together.tokens[0] == together.tokens[2] == alone.tokens[0]
    assert Sampler(a).pick(logits[0], 4) == alone.tokens[0]


# --- the detokenizer at the boundary -----------------------------------------------------------


def test_a_primed_detokenizer_continues_the_text_multibyte_included(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("naïve café — 日本語 ok ünïcödé 🙂 end").ids
    whole = IncrementalDetokenizer(tokenizer)
    deltas = [whole.push(t) for t in ids]
    tail = whole.flush()
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)
    held = [k for k in range(1, len(ids)) if "".join(deltas[:k]) != tokenizer.decode(ids[:k])]
    assert held, "no split point falls inside a character: the test would prove nothing"
    for k in range(1, len(ids)):
        resumed = IncrementalDetokenizer(tokenizer)
        for t in ids[:k]:
            resumed.push(t)
        assert [resumed.push(t) for t in ids[k:]] == deltas[k:]
        assert resumed.flush() == tail


# --- the engine --------------------------------------------------------------------------------


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


PARAMS = [
    SamplingParams(max_tokens=24, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.9, seed=31, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=1.3, top_k=20, top_p=0.9, seed=8, ignore_eos=True),
]


def _run(
    model: MoEModel, tokenizer: Tokenizer | None, requests: Sequence[EngineRequest]
) -> dict[str, list[TokenEvent]]:
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=256), tokenizer)
    return run_to_end(engine, list(requests))


def test_a_resumed_request_goes_on_as_the_unsplit_one(
    model: MoEModel, tokenizer: Tokenizer
) -> None:
    prompts = _prompts()
    whole = _run(
        model,
        tokenizer,
        [EngineRequest(str(i), p, s) for i, (p, s) in enumerate(zip(prompts, PARAMS, strict=True))],
    )
    for k in (1, 7, 13):
        # all three resumed together, in one batch: each as its unsplit self
        resumed = _run(
            model,
            tokenizer,
            [
                EngineRequest(str(i), p, s, resume_ids=[e.token_id for e in whole[str(i)][:k]])
                for i, (p, s) in enumerate(zip(prompts, PARAMS, strict=True))
            ],
        )
        for i, prompt in enumerate(prompts):
            before, after = whole[str(i)][:k], resumed[str(i)]
            expected = whole[str(i)][k:]
            assert [e.token_id for e in after] == [e.token_id for e in expected], (i, k)
            assert [e.index for e in after] == list(range(k, PARAMS[i].max_tokens))
            assert [e.text for e in after] == [e.text for e in expected], (i, k)
            text = "".join(e.text for e in before + after)
            assert text == "".join(e.text for e in whole[str(i)])
            assert after[-1].finish_reason == "length"  # max_tokens counted the resumed ones
            assert after[-1].num_prompt_tokens == len(prompt)
            assert after[-1].num_cached_prompt_tokens <= len(prompt)
            assert [e.logprob for e in after] == pytest.approx(
                [e.logprob for e in expected], abs=1e-4
            )  # prefill vs decode numerics


def test_a_stop_token_among_the_resumed_ones_is_not_seen_again(model: MoEModel) -> None:
    prompt = _prompts()[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    whole = _run(model, None, [EngineRequest("a", prompt, params)])["a"]
    stop = whole[6].token_id
    if stop in [e.token_id for e in whole[:6]]:
        pytest.skip("the greedy run repeats its stop token early: no clean split")
    stopping = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop,))
    resumed = _run(
        model,
        None,
        [EngineRequest("a", prompt, stopping, resume_ids=[e.token_id for e in whole[:3]])],
    )["a"]
    assert [e.token_id for e in resumed] == [e.token_id for e in whole[3:7]]
    assert resumed[-1].finish_reason == "stop"


def test_resume_ids_are_bounded() -> None:
    with pytest.raises(ValueError, match=r"resume_ids holds 4 tokens.*max_tokens=4"):
        EngineRequest("a", [1, 2], SamplingParams(max_tokens=4), resume_ids=[5, 6, 7, 8])


def test_resume_ids_outside_the_vocabulary_are_refused(model: MoEModel) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))
    vocab = model.spec.vocab_size
    with pytest.raises(ValueError, match=r"resume_ids \[\d+\] are outside the vocabulary"):
        engine.validate(EngineRequest("a", [1, 2], resume_ids=[vocab]))
