"""The ``window`` KV policy against a dense reference with the evicted keys masked out.

The oracle is transformers run once over the whole sequence (prompt + generated tokens) with
a custom 4D attention mask and the default position ids: row i may attend column j iff j was
in the engine's cache when token i was computed, or j is i itself or an earlier token of i's
own prefill chunk. Which keys were cached is derived here, in pure Python, from the policy's
documented rule (sinks' and anchors' blocks are pinned; other full blocks are evicted oldest
first after every engine step until at most ``window`` keys remain; the current block stays),
never from the engine's state. Each row of a masked dense forward depends only on its own mask
row and on earlier rows, so one forward pass reproduces the engine's step-by-step computation;
the engine's greedy tokens must be the reference's argmax at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from cache.kv_policy import KVPolicy, window_position_limit
from cluster.engine.admission import validate_request
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import BuildCheckpoint
from tests.unit.kv_checks import WindowTrace, simulate_window, visibility_mask

BLOCK = 4
MAX_POSITIONS = 512  # the test checkpoint's max_position_embeddings
LOGPROB_ATOL = 1e-4


@dataclass(frozen=True)
class Scenario:
    name: str
    prompt_len: int
    max_tokens: int
    budget: int  # EngineConfig.max_num_batched_tokens: the prefill chunk size
    window: int
    sinks: int
    anchors: tuple[tuple[int, int], ...]
    num_blocks: int = 64

    def policy(self) -> KVPolicy:
        return KVPolicy(kind="window", window=self.window, sinks=self.sinks, anchors=self.anchors)


# The prompt fits the window and prefills in one step; decoding then runs far past the window,
# so blocks are evicted every few steps. Sinks pin block 0, the anchor [9, 11) pins block 2.
DECODE = Scenario("decode", 14, 48, 512, 16, 4, ((9, 11),))
# A prompt longer than the window, prefilled in chunks of 8 with evictions between chunks: the
# later chunks' queries must not see prompt keys evicted after the earlier chunks.
CHUNKED = Scenario("chunked", 30, 24, 8, 20, 2, ((13, 14),))
# Prompt + generation run past max_position_embeddings; a window keeps the cache small.
LONG = Scenario("long", 500, 24, 64, 16, 4, ((6, 7),), num_blocks=32)


def trace_for(scenario: Scenario, **overrides: Any) -> WindowTrace:
    kwargs: dict[str, Any] = {
        "block_size": BLOCK,
        "budget": scenario.budget,
        "window": scenario.window,
        "sinks": scenario.sinks,
        "anchors": scenario.anchors,
        **overrides,
    }
    return simulate_window(scenario.prompt_len, scenario.max_tokens, **kwargs)


def reference_logits(ref: Any, ids: Sequence[int], mask: torch.Tensor | None) -> torch.Tensor:
    """[T, V] fp32 logits of transformers on ``ids`` at positions 0..T-1 under ``mask``."""
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([list(ids)]), attention_mask=mask)
    return out.logits[0].float()


@dataclass(frozen=True)
class EngineRun:
    prompt: list[int]
    events: list[TokenEvent]
    num_held_after: int

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events]

    @property
    def computed_ids(self) -> list[int]:
        """Every token whose K/V the engine computed: all but the last generated one."""
        return self.prompt + self.tokens[:-1]


def run_engine(model: MoEModel, scenario: Scenario, seed: int = 0) -> EngineRun:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.spec.vocab_size, (scenario.prompt_len,), generator=gen)
    config = EngineConfig(
        block_size=BLOCK,
        num_blocks=scenario.num_blocks,
        max_num_batched_tokens=scenario.budget,
        enable_prefix_caching=True,
    )
    engine = LLMEngine(model, config)
    params = SamplingParams(max_tokens=scenario.max_tokens, ignore_eos=True)
    engine.add_request(EngineRequest(scenario.name, prompt.tolist(), params, scenario.policy()))
    events: list[TokenEvent] = []
    max_steps = scenario.prompt_len + scenario.max_tokens + 4  # a livelock fails, not hangs
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        events.extend(engine.step())
    assert not engine.has_unfinished(), f"{scenario.name}: unfinished after {max_steps} steps"
    return EngineRun(prompt.tolist(), events, engine.blocks.num_held)


@pytest.fixture(scope="module")
def checkpoint(shared_checkpoint: BuildCheckpoint) -> Path:
    return shared_checkpoint("mixtral", seed=11)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MoEModel:
    return MoEModel.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def ref(checkpoint: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runs() -> dict[str, EngineRun]:
    """Engine runs shared by several tests, made on first use."""
    return {}


def get_run(runs: dict[str, EngineRun], model: MoEModel, scenario: Scenario) -> EngineRun:
    if scenario.name not in runs:
        runs[scenario.name] = run_engine(model, scenario)
    return runs[scenario.name]


def chosen_logprobs(logits: torch.Tensor, run: EngineRun) -> torch.Tensor:
    """[N] reference log-probabilities of the engine's tokens (row P-1+k predicts token k)."""
    rows = logits[len(run.prompt) - 1 :]
    assert rows.shape[0] == len(run.tokens)
    return torch.log_softmax(rows, dim=-1).gather(1, torch.tensor(run.tokens)[:, None])[:, 0]


def assert_matches_reference(ref: Any, run: EngineRun, trace: WindowTrace) -> None:
    logits = reference_logits(ref, run.computed_ids, visibility_mask(trace.visible))
    expected = logits[len(run.prompt) - 1 :].argmax(dim=-1).tolist()
    for k, (got, want) in enumerate(zip(run.tokens, expected, strict=True)):
        assert got == want, f"generated token {k}: engine {got}, dense reference {want}"
    ours = torch.tensor([e.logprob for e in run.events])
    torch.testing.assert_close(ours, chosen_logprobs(logits, run), atol=LOGPROB_ATOL, rtol=0)


# --- the simulation itself: a wrong oracle would make every comparison below meaningless ---


def test_simulation_follows_the_documented_rule() -> None:
    trace = trace_for(DECODE)
    prompt, new = DECODE.prompt_len, DECODE.max_tokens
    # the prompt (14 < window) prefills in one step: every prompt token sees its whole prefix
    for i in range(prompt):
        assert trace.visible[i] == list(range(i + 1))
    for i, cols in enumerate(trace.visible):
        assert cols[-1] == i and cols == sorted(set(cols))
        assert set(range(min(i + 1, DECODE.sinks))) <= set(cols)  # sinks are never evicted
        if i >= 11:
            assert {9, 10} <= set(cols)  # nor is the anchor, once computed
        # at most `window` cached keys, plus the token itself
        assert len(cols) <= DECODE.window + 1
    # pinned blocks 0 and 2 survive to the end; blocks 1 and 3 were evicted
    assert {0, 2} <= set(trace.kept_blocks) and not {1, 3} & set(trace.kept_blocks)
    computed = prompt + new - 1
    # the last computed token sees every computed key but the evicted ones
    assert trace.truncated[-1] == computed - len(trace.visible[-1])
    assert trace.truncated[-1] >= 6 * BLOCK  # several evictions happened
    assert trace.truncated == sorted(trace.truncated) and trace.truncated[0] == 0
    # a window at least as long as the sequence never evicts: full causal attention
    full = trace_for(DECODE, window=10_000)
    assert full.visible == [list(range(i + 1)) for i in range(computed)]
    assert set(full.truncated) == {0}


# --- the engine against the dense reference ---


@pytest.mark.parametrize("scenario", [DECODE, CHUNKED], ids=lambda s: s.name)
def test_window_matches_dense_reference(
    scenario: Scenario, model: MoEModel, ref: Any, runs: dict[str, EngineRun]
) -> None:
    run = get_run(runs, model, scenario)
    trace = trace_for(scenario)
    assert len(run.events) == scenario.max_tokens
    assert run.events[-1].finish_reason == "length"
    assert [e.index for e in run.events] == list(range(scenario.max_tokens))
    assert_matches_reference(ref, run, trace)


@pytest.mark.parametrize("scenario", [DECODE, CHUNKED], ids=lambda s: s.name)
def test_truncation_counts_and_pinned_blocks(
    scenario: Scenario, model: MoEModel, runs: dict[str, EngineRun]
) -> None:
    run = get_run(runs, model, scenario)
    trace = trace_for(scenario)
    got = [e.num_truncated_tokens for e in run.events]
    assert got == trace.truncated, "num_truncated_tokens per event differs from the rule"
    assert run.events[-1].num_truncated_tokens == trace.truncated[-1] > 0
    # what the engine evicted is exactly what the rule evicts, and that leaves the sink and
    # anchor blocks in place: every key of theirs stays visible to the last computed token
    pinned = set(range(scenario.sinks)).union(*(range(s, e) for s, e in scenario.anchors))
    assert pinned <= set(trace.visible[-1])
    assert run.num_held_after == 0, "blocks leaked after the request finished"


def test_reference_comparison_is_sensitive(
    model: MoEModel, ref: Any, runs: dict[str, EngineRun]
) -> None:
    """Negative controls: wrong kept sets must disagree with the engine's windowed output."""
    run = get_run(runs, model, DECODE)
    ids = run.computed_ids
    # the 4D mask is honoured: a full causal mask gives the plain forward
    no_eviction = trace_for(DECODE, window=10_000)
    full = reference_logits(ref, ids, visibility_mask(no_eviction.visible))
    torch.testing.assert_close(full, reference_logits(ref, ids, None), atol=1e-5, rtol=0)
    ours = torch.tensor([e.logprob for e in run.events])
    wrong = {
        "anchor not pinned": trace_for(DECODE, anchors=()),
        "sinks not pinned": trace_for(DECODE, sinks=0),
        "one block fewer": trace_for(DECODE, window=DECODE.window - BLOCK),
    }
    diffs: dict[str, tuple[int, float]] = {}
    for name, trace in [("no eviction", no_eviction), *wrong.items()]:
        assert trace.visible != trace_for(DECODE).visible, name
        logits = (
            full
            if trace is no_eviction
            else reference_logits(ref, ids, visibility_mask(trace.visible))
        )
        argmax = logits[len(run.prompt) - 1 :].argmax(dim=-1).tolist()
        token_diffs = sum(a != b for a, b in zip(argmax, run.tokens, strict=True))
        logprob_diff = (ours - chosen_logprobs(logits, run)).abs().max().item()
        diffs[name] = (token_diffs, logprob_diff)
        assert token_diffs > 0 or logprob_diff > 100 * LOGPROB_ATOL, (
            f"{name}: the reference cannot tell it from the engine's window "
            f"({token_diffs} token diffs, max logprob diff {logprob_diff:.2e})"
        )
    # without any eviction the greedy tokens themselves change
    assert diffs["no eviction"][0] > 0, diffs


# --- limits ---


def test_window_runs_past_max_position_embeddings(
    model: MoEModel, ref: Any, runs: dict[str, EngineRun]
) -> None:
    assert model.spec.max_position_embeddings == MAX_POSITIONS
    assert LONG.prompt_len + LONG.max_tokens > MAX_POSITIONS
    # the window keeps the cache far below what the sequence would need without it
    assert LONG.num_blocks * BLOCK < LONG.prompt_len
    run = get_run(runs, model, LONG)
    trace = trace_for(LONG)
    assert len(run.events) == LONG.max_tokens
    assert [e.num_truncated_tokens for e in run.events] == trace.truncated
    assert run.num_held_after == 0
    assert_matches_reference(ref, run, trace)


def test_full_request_past_the_context_is_refused(model: MoEModel) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=256))
    params = SamplingParams(max_tokens=LONG.max_tokens, ignore_eos=True)
    request = EngineRequest("full", [5] * LONG.prompt_len, params, KVPolicy())
    with pytest.raises(ValueError, match="context"):
        engine.add_request(request)
    assert not engine.has_unfinished() and engine.num_requests == 0


@pytest.mark.parametrize(
    ("window", "sinks", "anchors"),
    [
        (8, 4, ((9, 11),)),  # 2 pinned blocks + 2 recent blocks need 16
        (12, 4, ((9, 11),)),
        (12, 5, ()),  # 5 sinks span two blocks
        (12, 0, ((3, 5),)),  # an anchor straddling a block boundary pins both
    ],
)
def test_window_too_small_for_its_pins_is_refused(
    model: MoEModel, window: int, sinks: int, anchors: tuple[tuple[int, int], ...]
) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=64))
    policy = KVPolicy(kind="window", window=window, sinks=sinks, anchors=anchors)
    request = EngineRequest("small", [5] * 10, SamplingParams(max_tokens=4), policy)
    with pytest.raises(ValueError, match=rf"window={window} is too small"):
        engine.add_request(request)
    assert not engine.has_unfinished() and engine.num_requests == 0


def test_window_prompt_larger_than_the_pool_is_refused_or_served(model: MoEModel) -> None:
    """A window request whose prefill can never fit the pool must not be accepted and starve."""
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=16))  # 64 key slots
    policy = KVPolicy(kind="window", window=16, sinks=4)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        engine.add_request(EngineRequest("big", [5] * 100, params, policy))
    except ValueError:
        return  # refused up front: fine
    events: list[TokenEvent] = []
    for _ in range(200):
        if not engine.has_unfinished():
            break
        events.extend(engine.step())
    assert len(events) == 4, (
        f"accepted, then produced {len(events)} of 4 tokens in 200 steps: the request starves"
    )


# --- a window against the context: the prompt and the pins fit it, generation runs on a while ---


POSITION_LIMIT = 8 * MAX_POSITIONS  # window_position_limit of the test checkpoint


def window_request(
    prompt_len: int, max_tokens: int = 4, window: int = 16, sinks: int = 0, anchors: Any = ()
) -> EngineRequest:
    policy = KVPolicy(kind="window", window=window, sinks=sinks, anchors=anchors)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return EngineRequest("w", [5] * prompt_len, params, policy)


def test_window_prompt_past_the_context_is_refused(model: MoEModel) -> None:
    """A 200k-token prompt with window=64 on a 512-context model was admitted."""
    engine = LLMEngine(model, EngineConfig(block_size=BLOCK, num_blocks=64))
    message = (
        r"^prompt \(200000 tokens\) exceeds the model's context of 512 tokens: even with "
        r"kv_policy 'window' the prompt must fit the context"
    )
    with pytest.raises(ValueError, match=message):
        engine.add_request(window_request(200_000, window=64))
    assert not engine.has_unfinished() and engine.num_requests == 0


def test_window_prompt_fits_the_context_exactly(model: MoEModel) -> None:
    validate_request(window_request(MAX_POSITIONS), model.spec, BLOCK, 64)
    with pytest.raises(ValueError, match=r"prompt \(513 tokens\) exceeds the model's context"):
        validate_request(window_request(MAX_POSITIONS + 1), model.spec, BLOCK, 64)


def test_window_generation_stops_at_the_position_limit(model: MoEModel) -> None:
    assert window_position_limit(MAX_POSITIONS) == POSITION_LIMIT == 4096
    validate_request(window_request(100, POSITION_LIMIT - 100), model.spec, BLOCK, 64)
    message = (
        r"^prompt \(100 tokens\) \+ max_tokens \(3997\) = 4097 exceeds 4096 positions, "
        r"the most a windowed sequence may reach on this model \(context 512\)"
    )
    with pytest.raises(ValueError, match=message):
        validate_request(window_request(100, POSITION_LIMIT - 99), model.spec, BLOCK, 64)


def test_window_larger_than_the_context_is_refused(model: MoEModel) -> None:
    validate_request(window_request(10, window=MAX_POSITIONS), model.spec, BLOCK, 10**6)
    message = r"^window=1024 exceeds the model's context of 512 tokens: allowed <= 512$"
    with pytest.raises(ValueError, match=message):
        validate_request(window_request(10, window=1024), model.spec, BLOCK, 10**6)


def test_sinks_past_the_context_are_refused(model: MoEModel) -> None:
    message = r"^sinks=600 exceeds the model's context of 512 tokens: allowed <= 512$"
    with pytest.raises(ValueError, match=message):
        validate_request(window_request(10, window=512, sinks=600), model.spec, BLOCK, 10**6)


def test_anchor_past_the_context_is_refused(model: MoEModel) -> None:
    request = window_request(10, window=512, anchors=((0, 4), (100, 600)))
    message = r"^anchor span \[100, 600\) ends past the model's context of 512 tokens"
    with pytest.raises(ValueError, match=message):
        validate_request(request, model.spec, BLOCK, 10**6)
    # ending exactly at the context is fine
    validate_request(window_request(10, window=512, anchors=((100, 512),)), model.spec, BLOCK, 64)


def test_rotary_tables_double_once_past_the_context(checkpoint: Path) -> None:
    """Past the context the tables were rebuilt at the exact size on every step: count them."""
    fresh = MoEModel.from_checkpoint(checkpoint)
    assert fresh.rope.max_positions == MAX_POSITIONS
    engine = LLMEngine(fresh, EngineConfig(block_size=BLOCK, num_blocks=32))
    engine.add_request(window_request(500, max_tokens=40, window=16, sinks=4))
    tables = [fresh.rope.cos]  # held, so that no rebuilt table can reuse an id
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
        if fresh.rope.cos is not tables[-1]:
            tables.append(fresh.rope.cos)
    assert not engine.has_unfinished()
    assert len(tables) == 2, f"the rotary tables were rebuilt {len(tables) - 1} times"
    assert fresh.rope.max_positions == 2 * MAX_POSITIONS and fresh.rope.num_builds == 2
    assert fresh.rope.limit == POSITION_LIMIT
