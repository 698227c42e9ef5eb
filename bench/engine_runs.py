"""Our engine's timed passes for bench/engine_throughput.py: a workload at given arrival times,
and multi-turn conversations with prefix caching on or off. Peak RSS comes from VmHWM, reset
through ``/proc/self/clear_refs`` before each pass.
"""

from __future__ import annotations

import gc
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import FIRST_ORDINARY_ID, load_average
from cache.block_allocator import blocks_for
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

CLOCK: Callable[[], float] = time.monotonic  # the engine's clock: TokenEvent.time uses it


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    seed: int
    # workload of phases 1, 2 and 4
    num_requests: int
    prompt_len: tuple[int, int]  # inclusive range, uniform
    output_len: tuple[int, int]
    # phase 2
    load_factor: float
    rate: float | None  # requests/s; None: load_factor x phase 1's request rate
    # phase 3
    conversations: int
    turns: int
    message_len: tuple[int, int]
    reply_len: tuple[int, int]
    # engine
    block_size: int
    kv_cache_mib: int
    max_num_seqs: int
    max_num_batched_tokens: int
    # phase 4 and 5
    hf_batch_size: int
    check_requests: int
    check_tokens: int


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: list[int]
    max_tokens: int


@dataclass
class EngineRun:
    """One timed pass of our engine over a workload."""

    name: str
    wall_s: float  # first submission (t=0) to the last token
    peak_rss_mib: float
    num_steps: int
    num_preemptions: int
    prompt_tokens: int
    prompt_tokens_computed: int
    num_blocks: int
    tokens: dict[str, list[int]]
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    cpu_s: float = 0.0  # process CPU time (all threads) during the run
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start, end
    step_s: list[float] = field(default_factory=list)
    step_prefill_tokens: list[int] = field(default_factory=list)
    step_decode_tokens: list[int] = field(default_factory=list)
    admission_lag_s: list[float] = field(default_factory=list)  # engine arrival - scheduled

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


@dataclass
class MultiTurnRun:
    prefix_caching: bool
    num_blocks: int
    wall_s: float
    prompt_tokens: int
    prompt_tokens_computed: int
    cached_prompt_tokens_reported: int  # sum of TokenEvent.num_cached_prompt_tokens
    num_evictions: int
    num_preemptions: int
    ttft_s_per_turn: list[float]  # mean over conversations
    replies: dict[str, list[int]]
    cpu_s: float
    load_average: tuple[float, float]


def random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)]


def make_workload(cfg: BenchConfig, vocab_size: int) -> list[Request]:
    """Fixed-seed requests: uniform prompt and output lengths in the configured ranges."""
    rng = random.Random(cfg.seed)
    requests = []
    for i in range(cfg.num_requests):
        prompt_len = rng.randint(*cfg.prompt_len)
        max_tokens = rng.randint(*cfg.output_len)
        requests.append(Request(f"r{i:03d}", random_ids(rng, prompt_len, vocab_size), max_tokens))
    return requests


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (s) of a Poisson process at ``rate``/s; the first request arrives at 0."""
    rng = random.Random(seed * 7919 + 1)
    offsets, t = [0.0], 0.0
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


def _vm_kib(field_name: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """VmHWM (since the last reset), else ru_maxrss (since process start)."""
    hwm = _vm_kib("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024


def current_rss_mib() -> float:
    rss = _vm_kib("VmRSS")
    return rss / 1024 if rss is not None else float("nan")


def engine_config(cfg: BenchConfig, **overrides: Any) -> EngineConfig:
    kwargs: dict[str, Any] = dict(
        block_size=cfg.block_size,
        num_blocks=None,
        kv_cache_bytes=cfg.kv_cache_mib * 2**20,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=True,
    )
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def to_engine_request(r: Request) -> EngineRequest:
    params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(r.request_id, r.prompt, params)


def run_engine(
    name: str,
    model: MoEModel,
    config: EngineConfig,
    requests: Sequence[Request],
    offsets: Sequence[float] | None = None,
) -> EngineRun:
    """Submit ``requests`` at ``offsets`` seconds after t=0 (None: all at t=0), step to the end.

    Requests are added between steps once their scheduled arrival has passed; when the engine is
    idle the loop sleeps until the next arrival. Latencies are measured from the scheduled time.
    """
    engine = LLMEngine(model, config, clock=CLOCK)  # allocates the KV pool: not timed
    if offsets is None:
        offsets = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: offsets[i])
    by_id = {r.request_id: i for i, r in enumerate(requests)}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    run = EngineRun(
        name=name,
        wall_s=0.0,
        peak_rss_mib=0.0,
        num_steps=0,
        num_preemptions=0,
        prompt_tokens=sum(len(r.prompt) for r in requests),
        prompt_tokens_computed=0,
        num_blocks=engine.blocks.num_blocks,
        tokens=tokens,
        ttft_s={},
        tpot_s={},
    )
    gc.collect()
    reset_peak_rss()
    load_start, cpu0 = load_average(), time.process_time()
    t0 = CLOCK()
    submitted = 0
    while submitted < len(order) or engine.has_unfinished():
        now = CLOCK()
        while submitted < len(order) and t0 + offsets[order[submitted]] <= now:
            request = requests[order[submitted]]
            engine.add_request(to_engine_request(request))
            run.admission_lag_s.append(CLOCK() - (t0 + offsets[order[submitted]]))
            submitted += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, t0 + offsets[order[submitted]] - CLOCK()))
            continue
        computed_before, step_start = engine.num_prompt_tokens_computed, CLOCK()
        events: list[TokenEvent] = engine.step()
        run.step_s.append(CLOCK() - step_start)
        run.step_prefill_tokens.append(engine.num_prompt_tokens_computed - computed_before)
        run.step_decode_tokens.append(len(events))
        for ev in events:
            tokens[ev.request_id].append(ev.token_id)
            first.setdefault(ev.request_id, ev.time)
            last[ev.request_id] = ev.time
    run.wall_s = max(last.values()) - t0
    run.cpu_s = time.process_time() - cpu0
    run.load_average = (load_start, load_average())
    run.peak_rss_mib = peak_rss_mib()
    run.num_steps = engine.num_steps
    run.num_preemptions = engine.scheduler.num_preemptions
    run.prompt_tokens_computed = engine.num_prompt_tokens_computed
    for r in requests:
        got = tokens[r.request_id]
        assert len(got) == r.max_tokens, (r.request_id, len(got), r.max_tokens)
        arrival = t0 + offsets[by_id[r.request_id]]
        run.ttft_s[r.request_id] = first[r.request_id] - arrival
        if len(got) > 1:
            run.tpot_s[r.request_id] = (last[r.request_id] - first[r.request_id]) / (len(got) - 1)
    return run


def make_conversations(
    cfg: BenchConfig, vocab_size: int
) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Per conversation and turn: the new user message ids, and the reply length."""
    rng = random.Random(cfg.seed * 31 + 17)
    messages = [
        [random_ids(rng, rng.randint(*cfg.message_len), vocab_size) for _ in range(cfg.turns)]
        for _ in range(cfg.conversations)
    ]
    replies = [
        [rng.randint(*cfg.reply_len) for _ in range(cfg.turns)] for _ in range(cfg.conversations)
    ]
    return messages, replies


def multiturn_num_blocks(cfg: BenchConfig) -> int:
    """Room for every conversation's full final history at once, plus one spare block each."""
    most_tokens = cfg.turns * (cfg.message_len[1] + cfg.reply_len[1])
    return cfg.conversations * (blocks_for(most_tokens, cfg.block_size) + 1)


def run_multiturn(
    cfg: BenchConfig,
    model: MoEModel,
    messages: list[list[list[int]]],
    reply_lens: list[list[int]],
    prefix_caching: bool,
) -> MultiTurnRun:
    num_blocks = multiturn_num_blocks(cfg)
    engine = LLMEngine(
        model,
        engine_config(cfg, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
        clock=CLOCK,
    )
    history: list[list[int]] = [[] for _ in range(cfg.conversations)]
    replies: dict[str, list[int]] = {}
    prompt_tokens = cached_reported = 0
    ttft_per_turn: list[float] = []
    load_start, cpu0 = load_average(), time.process_time()
    t0 = CLOCK()
    for turn in range(cfg.turns):
        ttfts: list[float] = []
        for c in range(cfg.conversations):
            prompt = history[c] + messages[c][turn]
            prompt_tokens += len(prompt)
            request = Request(f"c{c:02d}t{turn}", prompt, reply_lens[c][turn])
            replies[request.request_id] = []
            engine.add_request(to_engine_request(request))
        while engine.has_unfinished():
            for ev in engine.step():
                replies[ev.request_id].append(ev.token_id)
                if ev.index == 0:
                    ttfts.append(ev.time - ev.arrival_time)
                    cached_reported += ev.num_cached_prompt_tokens
        for c in range(cfg.conversations):
            reply = replies[f"c{c:02d}t{turn}"]
            assert len(reply) == reply_lens[c][turn]
            history[c] = history[c] + messages[c][turn] + reply
        ttft_per_turn.append(sum(ttfts) / len(ttfts))
    return MultiTurnRun(
        prefix_caching=prefix_caching,
        num_blocks=num_blocks,
        wall_s=CLOCK() - t0,
        prompt_tokens=prompt_tokens,
        prompt_tokens_computed=engine.num_prompt_tokens_computed,
        cached_prompt_tokens_reported=cached_reported,
        num_evictions=engine.blocks.num_evictions,
        num_preemptions=engine.scheduler.num_preemptions,
        ttft_s_per_turn=ttft_per_turn,
        replies=replies,
        cpu_s=time.process_time() - cpu0,
        load_average=(load_start, load_average()),
    )


def multiturn_ideal_computed(messages: list[list[list[int]]]) -> int:
    """Prompt tokens a token-granular cache must still compute: each new message, plus the
    previous reply's last token (it was sampled, never fed back, so it has no K/V yet)."""
    return sum(
        len(msg) + (1 if turn > 0 else 0) for conv in messages for turn, msg in enumerate(conv)
    )
