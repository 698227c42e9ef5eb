"""The engine: continuous batching, prefix reuse, preemption and abort on a real model, and
requests that fail alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, RequestFailure, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint
from tests.engine_runs import run_to_end
from tests.failing_rows import POISONED_TOKEN, fail_row, poison_token_embedding
from tests.reference import reference_greedy, reference_model

LENGTHS = (5, 40, 17, 90, 33, 64, 1, 48)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint("mixtral", tmp_path_factory.mktemp("engine") / "m", seed=2)


@pytest.fixture(scope="module")
def model(path: Path) -> MoEModel:
    return MoEModel.from_checkpoint(path)


def _prompts(seed: int = 0, lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _requests(prompts: list[list[int]], params: list[SamplingParams]) -> list[EngineRequest]:
    pairs = zip(prompts, params, strict=True)
    return [EngineRequest(str(i), p, s) for i, (p, s) in enumerate(pairs)]


def _tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


def test_batch_invariance_matches_solo_and_transformers(model: MoEModel, path: Path) -> None:
    prompts = _prompts()
    params = [_greedy(n) for n in (24, 8, 30, 12, 24, 3, 20, 16)]
    # a small budget and seat count: chunked prefill mixed with decodes, queueing
    config = EngineConfig(num_blocks=128, max_num_batched_tokens=32, max_num_seqs=5)
    engine = LLMEngine(model, config)
    reqs = [
        EngineRequest(str(i), p, s) for i, (p, s) in enumerate(zip(prompts, params, strict=True))
    ]
    together = run_to_end(engine, reqs)
    ref = reference_model(path)
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        alone = run_to_end(
            LLMEngine(model, EngineConfig(num_blocks=64)), [EngineRequest("x", prompt, p)]
        )
        assert _tokens(together[str(i)]) == _tokens(alone["x"])
        assert _tokens(together[str(i)]) == reference_greedy(ref, prompt, p.max_tokens)
        assert together[str(i)][-1].finish_reason == "length"


def test_prefix_reuse_computes_only_the_suffix(model: MoEModel) -> None:
    base = _prompts(seed=3, lengths=(150,))[0]
    follow = [*base, 7, 8, 9, 10, 11]
    engine = LLMEngine(model, EngineConfig(num_blocks=64, block_size=16))
    first = run_to_end(engine, [EngineRequest("a", base, _greedy(4))])
    assert first["a"][0].num_cached_prompt_tokens == 0
    assert engine.num_prompt_tokens_computed == 150
    second = run_to_end(engine, [EngineRequest("b", follow, _greedy(6))])
    # a finished with 153 computed tokens: 9 full blocks, then 9 slots (base[144:] and 3 of
    # its replies) kept as a partial tail; b copies the 6 of them that agree with its prompt
    assert _tokens(first["a"])[0] != 7  # else one more would agree
    cached = 150
    assert second["b"][0].num_cached_prompt_tokens == cached
    assert engine.num_prompt_tokens_computed == 150 + len(follow) - cached
    cold = LLMEngine(model, EngineConfig(num_blocks=64, enable_prefix_caching=False))
    assert _tokens(second["b"]) == _tokens(
        run_to_end(cold, [EngineRequest("b", follow, _greedy(6))])["b"]
    )
    assert cold.num_prompt_tokens_computed == len(follow)


def test_whole_prompt_cached_still_computes_one_token(model: MoEModel) -> None:
    prompt = _prompts(seed=4, lengths=(64,))[0]
    engine = LLMEngine(model, EngineConfig(num_blocks=32, block_size=16))
    one = run_to_end(engine, [EngineRequest("a", prompt, _greedy(5))])
    two = run_to_end(engine, [EngineRequest("b", prompt, _greedy(5))])
    assert two["b"][0].num_cached_prompt_tokens == 48
    assert _tokens(one["a"]) == _tokens(two["b"])


def test_preemption_recomputes_with_identical_output(model: MoEModel) -> None:
    prompts = _prompts(seed=5, lengths=(30, 31, 29, 33))
    params = [_greedy(40)] * 4
    solo = [
        _tokens(
            run_to_end(LLMEngine(model, EngineConfig(num_blocks=16)), [EngineRequest("x", p, s)])[
                "x"
            ]
        )
        for p, s in zip(prompts, params, strict=True)
    ]
    # 4 sequences of up to 73 tokens need 20 blocks of 16; give them 12
    engine = LLMEngine(model, EngineConfig(num_blocks=12, enable_prefix_caching=False))
    events = run_to_end(engine, _requests(prompts, params))
    assert engine.scheduler.num_preemptions > 0
    assert [_tokens(events[str(i)]) for i in range(4)] == solo


def test_seeded_sampling_survives_preemption(model: MoEModel) -> None:
    prompts = _prompts(seed=6, lengths=(30, 31, 29, 33))
    params = [
        SamplingParams(max_tokens=40, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)
    ]
    roomy = run_to_end(
        LLMEngine(model, EngineConfig(num_blocks=64)),
        _requests(prompts, params),
    )
    tight_engine = LLMEngine(model, EngineConfig(num_blocks=12))
    tight = run_to_end(tight_engine, _requests(prompts, params))
    assert tight_engine.scheduler.num_preemptions > 0
    assert {k: _tokens(v) for k, v in tight.items()} == {k: _tokens(v) for k, v in roomy.items()}


def test_abort_waiting_and_running_frees_blocks(model: MoEModel) -> None:
    prompts = _prompts(seed=7, lengths=(40, 40, 40))
    engine = LLMEngine(model, EngineConfig(num_blocks=64, max_num_seqs=2))
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, _greedy(30)))
    seen: dict[str, int] = {}
    for _ in range(4):
        for event in engine.step():
            seen[event.request_id] = seen.get(event.request_id, 0) + 1
    assert seen.get("0", 0) > 0 and "2" not in seen  # 0 runs, 2 waits
    assert engine.abort("0") and engine.abort("2") and not engine.abort("nope")
    while engine.has_unfinished():
        for event in engine.step():
            assert event.request_id == "1"
            seen["1"] = seen.get("1", 0) + 1
    assert seen["1"] == 30
    assert engine.blocks.num_held == 0


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 999], SamplingParams(), "outside the vocabulary"),
        ([5] * 500, SamplingParams(max_tokens=100), "exceeds the model's context of 512"),
        ([5] * 200, SamplingParams(max_tokens=200), "needs up to 25 KV blocks but the pool has 8"),
    ],
)
def test_bad_requests_are_refused(
    model: MoEModel, prompt: list[int], params: SamplingParams, message: str
) -> None:
    engine = LLMEngine(model, EngineConfig(num_blocks=8))
    with pytest.raises(ValueError, match=message):
        engine.add_request(EngineRequest("r", prompt, params))
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_refused(model: MoEModel) -> None:
    engine = LLMEngine(model, EngineConfig(num_blocks=8))
    engine.add_request(EngineRequest("r", [5, 6], _greedy(2)))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(EngineRequest("r", [5, 6], _greedy(2)))


def test_kv_budget_sets_the_pool_size(model: MoEModel) -> None:
    spec = model.spec
    per_block = spec.num_layers * 2 * 16 * spec.num_kv_heads * spec.head_dim * 4
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=per_block * 10 + 5))
    assert engine.blocks.num_blocks == 10 and engine.pool.nbytes == per_block * 10
    with pytest.raises(ValueError, match="holds no block"):
        LLMEngine(model, EngineConfig(kv_cache_bytes=per_block - 1))


def test_routing_matches_the_transformers_router(model: MoEModel, path: Path) -> None:
    prompt = _prompts(seed=8, lengths=(21,))[0]
    engine = LLMEngine(model, EngineConfig(num_blocks=16))
    request = EngineRequest("r", prompt, _greedy(6), return_routing=True)
    events = run_to_end(engine, [request])["r"]
    ids = prompt + [e.token_id for e in events[:-1]]
    with torch.inference_mode():
        out = reference_model(path)(torch.tensor([ids]), output_router_logits=True)
    k = model.spec.num_experts_per_tok
    for i, event in enumerate(events):
        position = len(prompt) - 1 + i  # the input position whose logits produced token i
        assert event.routing is not None
        assert [layer for layer, _ in event.routing] == list(model.spec.moe_layers)
        for (_, chosen), logits in zip(event.routing, out.router_logits, strict=True):
            expected = torch.topk(logits[position], k).indices.tolist()
            assert sorted(chosen) == sorted(expected)
    plain = run_to_end(LLMEngine(model, EngineConfig(num_blocks=16)), [EngineRequest("p", prompt)])
    assert all(e.routing is None for e in plain["p"])


def test_text_deltas_add_up_to_the_decode_of_the_output(model: MoEModel) -> None:
    from deploy.demo_model import demo_tokenizer

    tokenizer = demo_tokenizer()
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128), tokenizer)
    events = run_to_end(engine, _requests(_prompts(lengths=(9, 30)), [_greedy(40), _greedy(25)]))
    for stream in events.values():
        text = tokenizer.decode(_tokens(stream), skip_special_tokens=True)
        assert "".join(e.text for e in stream) == text


def _sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.9, seed=seed, ignore_eos=True)


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_row_that_cannot_be_sampled_fails_its_request_alone(
    model: MoEModel, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    prompts = _prompts(seed=9, lengths=(20, 35, 12, 50))
    params = [_greedy(12), _sampled(10, seed=3), _greedy(8), _sampled(30, seed=4)]
    requests = _requests(prompts, params)  # "3" fails at its fifth token
    # chunked prefill beside decodes: "3" fails in a mixed batch
    engine = LLMEngine(model, EngineConfig(num_blocks=64, max_num_batched_tokens=32))
    for request in requests:
        engine.add_request(request)
    fail_row(engine, monkeypatch, "3", after=4, how=how)
    events: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    failures: list[RequestFailure] = []
    while engine.has_unfinished():
        for event in engine.step():
            events[event.request_id].append(event)
        failures += engine.failures
    assert [f.request_id for f in failures] == ["3"]
    assert ("not finite" if how == "nan" else "raised RuntimeError") in failures[0].reason
    assert [e.finish_reason for e in events["3"]] == [None] * 4
    assert engine.blocks.num_held == 0 and engine.num_requests == 0
    for request in requests[:3]:  # the others: what they produce alone
        alone = run_to_end(LLMEngine(model, EngineConfig(num_blocks=64)), [request])
        assert _tokens(events[request.request_id]) == _tokens(alone[request.request_id])
        assert events[request.request_id][-1].finish_reason == "length"


def test_a_failed_rows_new_kv_is_not_cached(
    model: MoEModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The K/V computed in the step where a row failed may be what failed (NaN from the
    model): it is not registered for reuse, so a later request computes it afresh."""
    prompt = _prompts(seed=11, lengths=(40,))[0]
    engine = LLMEngine(model, EngineConfig(num_blocks=32, block_size=16))
    engine.add_request(EngineRequest("bad", prompt, _greedy(5)))
    fail_row(engine, monkeypatch, "bad", after=0, how="nan")
    assert engine.step() == [] and [f.request_id for f in engine.failures] == ["bad"]
    assert engine.blocks.num_held == 0 and not engine.has_unfinished()
    monkeypatch.undo()
    again = run_to_end(engine, [EngineRequest("again", prompt, _greedy(5))])
    assert again["again"][0].num_cached_prompt_tokens == 0
    assert engine.failures == []


def test_nan_kv_of_a_failed_row_never_reaches_other_requests(tmp_path: Path) -> None:
    """NaN logits from the model itself (a poisoned prompt token): the row's K/V is NaN too,
    leaking within its chunk into its first slot, here pool slot 0, which attention reads as
    every sequence's key padding. The engine zeroes it: later requests, joining one per step
    (so decodes share groups with unequal key counts), produce what they do alone."""
    model_dir = build_family_checkpoint("mixtral", tmp_path / "m", seed=2)
    poison_token_embedding(model_dir)
    model = MoEModel.from_checkpoint(model_dir)
    engine = LLMEngine(model, EngineConfig(num_blocks=16))
    engine.add_request(EngineRequest("bad", [5, POISONED_TOKEN, 7], _greedy(4)))
    assert engine.step() == [] and [f.request_id for f in engine.failures] == ["bad"]
    prompts = _prompts(seed=12, lengths=(5, 9, 3, 14))
    pending = [EngineRequest(str(i), p, _greedy(8)) for i, p in enumerate(prompts)]
    alone = {
        r.request_id: _tokens(
            run_to_end(LLMEngine(model, EngineConfig(num_blocks=16)), [r])[r.request_id]
        )
        for r in pending
    }
    events: dict[str, list[int]] = {r.request_id: [] for r in pending}
    failures: list[RequestFailure] = []
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(pending.pop(0))
        for event in engine.step():
            events[event.request_id].append(event.token_id)
        failures += engine.failures
    assert failures == [] and events == alone


def test_tiny_temperatures_run_greedy_beside_the_others(model: MoEModel) -> None:
    """Subnormal temperatures are accepted and used to stop the engine (inf/NaN probabilities
    raised in its step); now they sample greedily, and the batch goes on."""
    prompts = _prompts(seed=10, lengths=(15, 22, 9, 30))
    tiny = [1e-38, 1e-45, 5e-324]
    params = [
        SamplingParams(max_tokens=10, temperature=t, top_k=5, top_p=0.9, seed=1, ignore_eos=True)
        for t in tiny
    ] + [_sampled(10, seed=2)]
    engine = LLMEngine(model, EngineConfig(num_blocks=64))
    events = run_to_end(engine, _requests(prompts, params))
    assert engine.failures == []
    for i, prompt in enumerate(prompts[:3]):
        alone = EngineRequest("g", prompt, _greedy(10))
        greedy = run_to_end(LLMEngine(model, EngineConfig(num_blocks=64)), [alone])
        assert _tokens(events[str(i)]) == _tokens(greedy["g"])
    assert [len(v) for v in events.values()] == [10] * 4
