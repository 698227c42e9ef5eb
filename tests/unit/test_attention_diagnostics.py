"""Attention diagnostics on request, against transformers' eager attention weights.

The oracle is transformers run once over the whole sequence (prompt + generated tokens but the
last) with ``output_attentions=True``: the row of the position that produced generated token k
(the last prompt position for k = 0) gives, per layer and query head, the attention
distribution the engine's probe must reproduce. For a window KV policy the same forward runs
under the test_kv_window 4D mask, whose rows are the softmax over the keys the engine kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from cache.kv_policy import KVPolicy
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from cluster.engine.sequence import Sequence as Seq
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.engine_runs import run_to_end
from tests.unit.kv_checks import simulate_window, visibility_mask

FAMILIES = ("mixtral", "qwen3", "llama")  # GQA MoE, GQA with q/k norms, MQA
PROMPT_LENS = (37, 5, 20, 16)
FIRST_TOKENS = (4, 1, 100, 16)  # N per prompt: a few, one, past the end, exactly one block
NEW_TOKENS = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def mixtral(family_checkpoints: dict[str, Path]) -> MoEModel:
    return MoEModel.from_checkpoint(family_checkpoints["mixtral"])


@pytest.fixture(scope="module")
def mixtral_ref(family_checkpoints: dict[str, Path]) -> Any:
    return _eager(family_checkpoints["mixtral"])


def _eager(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _prompts(vocab: int, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _requests(
    prompts: Sequence[list[int]], first_tokens: Sequence[int], new: int = NEW_TOKENS, **kw: Any
) -> list[EngineRequest]:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    return [
        EngineRequest(str(i), p, params, attention_first_tokens=n, **kw)
        for i, (p, n) in enumerate(zip(prompts, first_tokens, strict=True))
    ]


def reference_stats(
    ref: Any, prompt: list[int], events: Sequence[TokenEvent], first: int, mask: Any = None
) -> torch.Tensor:
    """[K, L, 2] (entropy, first-N mass) per generated token and layer, mean over heads."""
    ids = prompt + [e.token_id for e in events[:-1]]
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([ids]), attention_mask=mask, output_attentions=True)
    rows = torch.arange(len(prompt) - 1, len(ids))  # [K] positions that produced each token
    per_layer = []
    for weights in out.attentions:  # [1, Hq, T, T]
        p = weights[0][:, rows].double()  # [Hq, K, T]
        entropy = -torch.special.xlogy(p, p).sum(-1).mean(0)  # [K]
        mass = p[..., :first].sum(-1).mean(0)  # [K]
        per_layer.append(torch.stack([entropy, mass], -1))  # [K, 2]
    return torch.stack(per_layer, 1).float()  # [K, L, 2]


def engine_stats(events: Sequence[TokenEvent]) -> torch.Tensor:  # [K, L, 2]
    assert all(e.attention is not None for e in events)
    return torch.tensor([list(e.attention or ()) for e in events])


# --- against the dense reference ---


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_eager_transformers(family: str, family_checkpoints: dict[str, Path]) -> None:
    model = MoEModel.from_checkpoint(family_checkpoints[family])
    prompts = _prompts(model.spec.vocab_size, PROMPT_LENS)
    # a budget of 32 chunks the 37-token prompt and mixes prefill chunks with decodes in a step
    config = EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=32)
    requests = _requests(prompts, FIRST_TOKENS)
    requests.append(EngineRequest("plain", prompts[0], requests[0].params))
    events = run_to_end(LLMEngine(model, config), requests)
    assert all(e.attention is None for e in events["plain"])
    ref = _eager(family_checkpoints[family])
    for i, (prompt, first) in enumerate(zip(prompts, FIRST_TOKENS, strict=True)):
        got = engine_stats(events[str(i)])
        assert got.shape == (NEW_TOKENS, model.spec.num_layers, 2)
        want = reference_stats(ref, prompt, events[str(i)], first)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        if first >= len(prompt) + NEW_TOKENS:  # every key is a first token
            torch.testing.assert_close(got[..., 1], torch.ones_like(got[..., 1]))
    # the comparison can tell heads and positions apart: the stats are far from constant
    spread = engine_stats(events["0"])
    assert spread[..., 0].std() > 0.05 and spread[..., 1].std() > 0.01


def test_probe_leaves_outputs_unchanged(mixtral: MoEModel) -> None:
    model = mixtral
    prompts = _prompts(model.spec.vocab_size, PROMPT_LENS, seed=3)
    config = EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=32)
    probed = run_to_end(LLMEngine(model, config), _requests(prompts, FIRST_TOKENS, new=8))
    plain = run_to_end(LLMEngine(model, config), _requests(prompts, [0] * len(prompts), new=8))
    for rid, events in plain.items():
        assert [e.token_id for e in probed[rid]] == [e.token_id for e in events]
        assert [e.logprob for e in probed[rid]] == [e.logprob for e in events]
        assert all(e.attention is None for e in events)


# --- window KV policy: the first tokens are the sinks, when kept ---

WINDOW_BLOCK = 4


@pytest.mark.parametrize(
    ("prompt_len", "budget", "window", "sinks", "anchors", "first"),
    [
        # block 0 (sinks) and block 2 (anchor) stay, block 1 is evicted: first keys 0-3, 8-11
        (14, 512, 16, 4, ((9, 11),), 12),
        # positions 4-5 share evicted block 1 with 6-7: only the sinks keep carrying mass
        (14, 512, 16, 4, (), 6),
        # a prompt longer than the window, prefilled in chunks of 8 with evictions between
        (30, 8, 20, 2, ((13, 14),), 16),
    ],
)
def test_window_stats_match_the_masked_reference(
    prompt_len: int,
    budget: int,
    window: int,
    sinks: int,
    anchors: tuple[tuple[int, int], ...],
    first: int,
    mixtral: MoEModel,
    mixtral_ref: Any,
) -> None:
    model, new = mixtral, 24
    prompt = _prompts(model.spec.vocab_size, [prompt_len], seed=5)[0]
    policy = KVPolicy(kind="window", window=window, sinks=sinks, anchors=anchors)
    config = EngineConfig(block_size=WINDOW_BLOCK, num_blocks=64, max_num_batched_tokens=budget)
    events = run_to_end(
        LLMEngine(model, config), _requests([prompt], [first], new, kv_policy=policy)
    )
    run = events["0"]
    assert run[-1].num_truncated_tokens > first, "the scenario must evict past the first tokens"
    trace = simulate_window(
        prompt_len,
        new,
        block_size=WINDOW_BLOCK,
        budget=budget,
        window=window,
        sinks=sinks,
        anchors=anchors,
    )
    mask = visibility_mask(trace.visible)
    got = engine_stats(run)
    want = reference_stats(mixtral_ref, prompt, run, first, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    mass = got[..., 1]
    assert ((mass >= 0) & (mass <= 1 + 1e-6)).all()
    assert (mass[-1] > 0).all(), "the kept sinks still carry mass"


def test_window_without_sinks_loses_the_first_tokens(mixtral: MoEModel) -> None:
    model = mixtral
    prompt = _prompts(model.spec.vocab_size, [14], seed=6)[0]
    policy = KVPolicy(kind="window", window=16, sinks=0)
    config = EngineConfig(block_size=WINDOW_BLOCK, num_blocks=64)
    run = run_to_end(LLMEngine(model, config), _requests([prompt], [4], 24, kv_policy=policy))["0"]
    mass = engine_stats(run)[..., 1]  # [K, L]
    assert (mass[0] > 0).all(), "before any eviction the first tokens are attended"
    evicted = [k for k, e in enumerate(run) if e.num_truncated_tokens >= 4]
    assert evicted, "the scenario must evict block 0"
    assert (mass[evicted] == 0).all()


# --- the bookkeeping and the input check ---


def test_first_keys_follow_the_logical_blocks() -> None:
    seq = Seq("r", [5] * 30, SamplingParams(), KVPolicy(), 0.0)
    seq.logical_blocks = [0, 2, 5, 6]  # blocks 1, 3 and 4 evicted; block 6 holds 2 keys
    keys = 3 * 4 + 2
    assert seq.num_keys_before(0, keys, 4) == 0
    assert seq.num_keys_before(3, keys, 4) == 3
    assert seq.num_keys_before(6, keys, 4) == 4  # positions 4-5 are gone
    assert seq.num_keys_before(10, keys, 4) == 6  # 0-3 and 8-9
    assert seq.num_keys_before(25, keys, 4) == 13  # up to position 24 in block 6
    assert seq.num_keys_before(10**6, keys, 4) == keys


@pytest.mark.parametrize("first", [-1, 1_000_001])
def test_bad_first_tokens_are_refused(first: int, mixtral: MoEModel) -> None:
    engine = LLMEngine(mixtral, EngineConfig(num_blocks=8))
    request = EngineRequest("r", [5, 6], attention_first_tokens=first)
    with pytest.raises(ValueError, match=rf"attention_first_tokens={first} must be in \[0, "):
        engine.add_request(request)
    assert not engine.has_unfinished()
    engine.add_request(EngineRequest("ok", [5, 6], attention_first_tokens=1_000_000))


def test_gpt_oss_stats_honour_sinks_and_windows(shared_checkpoint: BuildCheckpoint) -> None:
    """gpt-oss: each layer's softmax has its sink (whose share counts in neither figure), a
    sliding layer's covers its window only (its blocks before it freed); prompts longer than
    the window, chunked prefill with decodes in the same steps."""
    path = shared_checkpoint("gpt_oss", seed=7)
    model = MoEModel.from_checkpoint(path)
    assert model.spec.sliding_window is not None and model.spec.sliding_window < 37
    prompts = _prompts(model.spec.vocab_size, PROMPT_LENS)
    config = EngineConfig(block_size=4, num_blocks=128, max_num_batched_tokens=16)
    events = run_to_end(LLMEngine(model, config), _requests(prompts, FIRST_TOKENS))
    ref = _eager(path)
    for i, (prompt, first) in enumerate(zip(prompts, FIRST_TOKENS, strict=True)):
        got = engine_stats(events[str(i)])
        want = reference_stats(ref, prompt, events[str(i)], first)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the sinks take a share: no layer's keys carry all the mass, as a plain softmax's would
    mass = engine_stats(events["2"])[..., 1]  # every key a first token
    assert (mass < 1 - 1e-4).all()
    # the first 4 tokens of the 37-token prompt are out of the sliding layers' window
    sliding = [i for i in range(model.spec.num_layers) if model.spec.is_sliding_layer(i)]
    full = [i for i in range(model.spec.num_layers) if not model.spec.is_sliding_layer(i)]
    first_mass = engine_stats(events["0"])[..., 1]  # [K, L]
    assert (first_mass[:, sliding] == 0).all() and (first_mass[:, full] > 0).all()
