"""Engine throughput and latency: continuous batching vs transformers static batches, prefix reuse.

All phases use the ``bench`` demo checkpoint (Mixtral family, hidden 512, 8 layers, 16 experts
top-2, vocab 2048; built into ``.demo-models/bench`` on first use), greedy decoding with no EOS
stop, in one process, one phase after the other:

1. **Our engine, all at once**: a fixed-seed workload of ``--requests`` requests (mixed prompt
   and output lengths) is submitted to one ``LLMEngine`` at t=0 and stepped to completion.
2. **Our engine, Poisson arrivals**: the same requests arrive at exponential inter-arrival times
   at a rate of ``--load-factor`` x the request rate phase 1 sustained (or ``--rate``); a loop
   adds every request whose scheduled arrival has passed between ``step()`` calls. TTFT is
   measured from the *scheduled* arrival, so time spent waiting for the current step counts.
3. **Multi-turn prefix reuse**: ``--conversations`` conversations x ``--turns`` turns; each
   turn's prompt is the whole history (previous prompts and generated replies) plus a new user
   message; turn t of every conversation is submitted together and run to completion before
   turn t+1. Run once with prefix caching on and once off; prompt tokens computed are compared.
4. **transformers ``generate``** on the phase-1 requests in static, left-padded batches of
   ``--hf-batch-size`` (in request order); each batch runs to its longest ``max_tokens`` and
   only each request's own requested tokens count as output.
5. **Correctness** (not timed): for ``--check-requests`` requests, our phase-1 tokens equal
   transformers' unpadded (batch of one) greedy tokens, first ``--check-tokens`` tokens.

Metrics: output tokens/s (all output tokens / wall seconds from the first submission to the last
token), TTFT p50/p99 (first token time - arrival), time per output token p50/p99 (per request
``(last token time - first token time) / (n - 1)``), peak RSS of the process during the phase
(VmHWM after resetting it through ``/proc/self/clear_refs``; our model is released before
transformers' is loaded, so each phase holds one model). Each engine gets one small warm-up run
first (pages in every weight); single timed runs, no repeats.

Targets: ``throughput_vs_transformers`` = phase-1 tok/s / phase-4 tok/s (goal >= 2.0) and
``multiturn_prefill_ratio`` = prompt tokens computed with prefix caching / without (goal <= 0.2).

Run: ``.venv/bin/python bench/engine_throughput.py`` (full: about 19 minutes on this 2-core
machine, of which ~5 in the all-at-once phase, ~7 in the Poisson phase, whose arrivals span
1/load-factor times as long, and ~5 in transformers) or ``--quick`` (smoke, 1-3 minutes). Writes
``bench/results/engine_throughput.json`` (quick: ``...quick.json``). The JSON records, per phase,
the process CPU seconds per wall second and the load average: well under torch's thread count
means other work shared the cores and the timings are pessimistic.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from cache.block_allocator import blocks_for
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest, TokenEvent
from deploy.demo_model import PAD_ID, build_demo_model, is_demo_model
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".demo-models" / "bench"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "engine_throughput.json"
QUICK_OUT = REPO_ROOT / "bench" / "results" / "engine_throughput.quick.json"
PRESET = "bench"
FIRST_ORDINARY_ID = 3  # ids 0..2 are <s>, </s>, <pad> in every demo preset
THROUGHPUT_GOAL = 2.0  # ours / transformers static batches, at least
PREFILL_RATIO_GOAL = 0.20  # prompt tokens computed with / without prefix caching, at most
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
class HFRun:
    wall_s: float
    batch_wall_s: list[float]
    useful_tokens: int  # each request's own max_tokens
    generated_tokens: int  # rows x the batch's longest max_tokens (padding included)
    padded_prompt_tokens: int
    prompt_tokens: int
    peak_rss_mib: float
    tokens: dict[str, list[int]]
    cpu_s: float
    load_average: tuple[float, float]

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall_s


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


# --------------------------------------------------------------------------- setup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: small, short workload")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {DEFAULT_OUT} (quick: {QUICK_OUT.name})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random workload")
    parser.add_argument("--requests", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--load-factor", type=float, default=0.7)
    parser.add_argument("--rate", type=float, default=None, help="Poisson rate, requests/s")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="phases 1 and 2")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    num_requests = args.requests if args.requests is not None else (16 if quick else 64)
    if num_requests < 1 or args.hf_batch_size < 1 or args.kv_cache_mib < 1:
        raise SystemExit("--requests, --hf-batch-size and --kv-cache-mib must be >= 1")
    if not 0 < args.load_factor <= 10 or (args.rate is not None and args.rate <= 0):
        raise SystemExit("--load-factor must be in (0, 10] and --rate > 0")
    return BenchConfig(
        quick=quick,
        seed=args.seed,
        num_requests=num_requests,
        prompt_len=(16, 128) if quick else (16, 512),
        output_len=(8, 32) if quick else (16, 256),
        load_factor=args.load_factor,
        rate=args.rate,
        conversations=4 if quick else 16,
        turns=3 if quick else 6,
        message_len=(16, 48),
        reply_len=(8, 16) if quick else (16, 32),
        block_size=16,
        kv_cache_mib=args.kv_cache_mib,
        max_num_seqs=64,
        max_num_batched_tokens=512,
        hf_batch_size=args.hf_batch_size,
        check_requests=2,
        check_tokens=16 if quick else 64,
    )


def say(msg: str) -> None:
    print(f"[engine_throughput] {msg}", flush=True)


def ensure_checkpoint(model_dir: Path) -> Path:
    """The bench checkpoint, built on first use (with progress) and reused afterwards."""
    if is_demo_model(model_dir) and (model_dir / "config.json").is_file():
        say(f"using cached checkpoint {model_dir}")
        return model_dir
    say(f"building the {PRESET!r} demo checkpoint into {model_dir} (once; ~1 GB)")
    return build_demo_model(model_dir, preset=PRESET, progress=lambda m: say(f"  build: {m}"))


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


# --------------------------------------------------------------------------- measurement helpers


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


def load_1min() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def current_rss_mib() -> float:
    rss = _vm_kib("VmRSS")
    return rss / 1024 if rss is not None else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First differing position over the common length; len(shorter) if only lengths differ."""
    for pos, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return pos
    return None if len(a) == len(b) else min(len(a), len(b))


# --------------------------------------------------------------------------- our engine


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
    load_start, cpu0 = load_1min(), time.process_time()
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
    run.load_average = (load_start, load_1min())
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
    load_start, cpu0 = load_1min(), time.process_time()
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
        load_average=(load_start, load_1min()),
    )


def multiturn_ideal_computed(messages: list[list[list[int]]]) -> int:
    """Prompt tokens a token-granular cache must still compute: each new message, plus the
    previous reply's last token (it was sampled, never fed back, so it has no K/V yet)."""
    return sum(
        len(msg) + (1 if turn > 0 else 0) for conv in messages for turn, msg in enumerate(conv)
    )


# --------------------------------------------------------------------------- transformers


def hf_generate(
    hf: transformers.PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int
) -> list[list[int]]:
    """Greedy, no EOS, left-padded batch; returns ``new_tokens`` ids per row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    with torch.inference_mode():
        # mypy sees PreTrainedModel.generate as a Module attribute (Tensor | Module)
        generator: Any = hf
        out = generator.generate(ids, attention_mask=mask, generation_config=config)
    generated = out[:, width:]
    assert generated.shape[1] == new_tokens, tuple(generated.shape)
    return [list(map(int, row)) for row in generated.tolist()]


def load_hf(model_dir: Path) -> transformers.PreTrainedModel:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # else generate merges the checkpoint's EOS back in
    hf.generation_config.pad_token_id = PAD_ID
    return hf


def run_hf_static(
    hf: transformers.PreTrainedModel, requests: Sequence[Request], batch_size: int
) -> HFRun:
    tokens: dict[str, list[int]] = {}
    batch_walls: list[float] = []
    generated = padded_prompt = 0
    gc.collect()
    reset_peak_rss()
    load_start, cpu0 = load_1min(), time.process_time()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        longest = max(r.max_tokens for r in batch)
        t = time.perf_counter()
        rows = hf_generate(hf, [r.prompt for r in batch], longest)
        batch_walls.append(time.perf_counter() - t)
        generated += len(batch) * longest
        padded_prompt += len(batch) * max(len(r.prompt) for r in batch)
        for r, row in zip(batch, rows, strict=True):
            tokens[r.request_id] = row[: r.max_tokens]
        say(
            f"  transformers batch {start // batch_size + 1}: {len(batch)} requests, "
            f"{longest} steps, {batch_walls[-1]:.1f}s"
        )
    return HFRun(
        wall_s=sum(batch_walls),
        batch_wall_s=batch_walls,
        useful_tokens=sum(r.max_tokens for r in requests),
        generated_tokens=generated,
        padded_prompt_tokens=padded_prompt,
        prompt_tokens=sum(len(r.prompt) for r in requests),
        peak_rss_mib=peak_rss_mib(),
        tokens=tokens,
        cpu_s=time.process_time() - cpu0,
        load_average=(load_start, load_1min()),
    )


def check_requests(requests: Sequence[Request], count: int) -> list[Request]:
    """The shortest-prompt and the longest-prompt requests (then the next ones by length)."""
    by_len = sorted(requests, key=lambda r: (len(r.prompt), r.request_id))
    picked: list[Request] = []
    while len(picked) < min(count, len(by_len)):
        picked.append(by_len.pop(0) if len(picked) % 2 == 0 else by_len.pop())
    return picked


# --------------------------------------------------------------------------- reporting


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def contention_json(cpu_s: float, wall_s: float, load: tuple[float, float]) -> dict[str, Any]:
    """CPU seconds per wall second near torch's thread count, and a low load average, mean
    the phase had the cores to itself."""
    return {
        "process_cpu_s": cpu_s,
        "cpu_per_wall": cpu_s / wall_s,
        "load_average_1min_start_end": list(load),
    }


def contention_note(cpu_s: float, wall_s: float, load: tuple[float, float]) -> str:
    return f"cpu/wall {cpu_s / wall_s:.2f}, load {load[0]:.2f}->{load[1]:.2f}"


def engine_run_json(run: EngineRun) -> dict[str, Any]:
    steps = run.step_s
    prefill_steps = [s for s, p in zip(steps, run.step_prefill_tokens, strict=True) if p > 0]
    decode_steps = [s for s, p in zip(steps, run.step_prefill_tokens, strict=True) if p == 0]
    return {
        "wall_s": run.wall_s,
        "output_tokens": run.output_tokens,
        "output_tok_s": run.tok_s,
        "requests_per_s": len(run.tokens) / run.wall_s,
        "ttft_s": latency_summary(list(run.ttft_s.values())),
        "tpot_s": latency_summary(list(run.tpot_s.values())),
        "peak_rss_mib": run.peak_rss_mib,
        "num_steps": run.num_steps,
        "num_preemptions": run.num_preemptions,
        "num_kv_blocks": run.num_blocks,
        "prompt_tokens": run.prompt_tokens,
        "prompt_tokens_computed": run.prompt_tokens_computed,
        "step_time_s": {
            "total": sum(steps),
            "steps_with_prefill": len(prefill_steps),
            "time_in_steps_with_prefill": sum(prefill_steps),
            "decode_only_steps": len(decode_steps),
            "time_in_decode_only_steps": sum(decode_steps),
            "decode_only_step_mean": (
                sum(decode_steps) / len(decode_steps) if decode_steps else float("nan")
            ),
            "mean_tokens_sampled_per_step": sum(run.step_decode_tokens) / max(1, len(steps)),
        },
        "admission_lag_s": latency_summary(run.admission_lag_s),
        **contention_json(run.cpu_s, run.wall_s, run.load_average),
    }


def format_table(
    runs: Sequence[EngineRun],
    hf: HFRun,
    hf_batch_size: int,
    checks_ok: bool,
    mt_on: MultiTurnRun,
    mt_off: MultiTurnRun,
) -> str:
    header = (
        f"{'phase':<26} | {'out tok/s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8} | "
        f"{'TPOT p50':>8} | {'TPOT p99':>8} | {'peak RSS':>9} | {'tokens = HF':>11}"
    )
    lines = [header, "-" * len(header)]
    match = "yes" if checks_ok else "NO"
    for run in runs:
        ttft, tpot = list(run.ttft_s.values()), list(run.tpot_s.values())
        lines.append(
            f"{run.name:<26} | {run.tok_s:>9.1f} | {percentile(ttft, 50):>7.2f}s | "
            f"{percentile(ttft, 99):>7.2f}s | {percentile(tpot, 50) * 1e3:>6.0f}ms | "
            f"{percentile(tpot, 99) * 1e3:>6.0f}ms | {run.peak_rss_mib:>6.0f}MiB | {match:>11}"
        )
    dash = "-"
    lines.append(
        f"{f'transformers static b{hf_batch_size}':<26} | {hf.tok_s:>9.1f} | {dash:>8} | "
        f"{dash:>8} | {dash:>8} | {dash:>8} | {hf.peak_rss_mib:>6.0f}MiB | {'(oracle)':>11}"
    )
    ratio = mt_on.prompt_tokens_computed / mt_off.prompt_tokens_computed
    lines += [
        "",
        f"{'multi-turn':<26} | {'prompt tokens':>13} | {'computed':>8} | {'wall':>7} | "
        f"{'mean TTFT':>9} | {'evictions':>9}",
    ]
    for mt in (mt_off, mt_on):
        name = f"prefix caching {'on' if mt.prefix_caching else 'off'}"
        mean_ttft = sum(mt.ttft_s_per_turn) / len(mt.ttft_s_per_turn)
        lines.append(
            f"{name:<26} | {mt.prompt_tokens:>13} | {mt.prompt_tokens_computed:>8} | "
            f"{mt.wall_s:>6.1f}s | {mean_ttft:>8.2f}s | {mt.num_evictions:>9}"
        )
    lines.append(f"{'computed ratio on / off':<26} | {ratio:.3f}")
    return "\n".join(lines)


def machine_facts() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "transformers": transformers.__version__,
    }


def load_average() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def target(value: float, goal: float, at_least: bool) -> dict[str, Any]:
    met = value >= goal if at_least else value <= goal
    return {"value": value, "goal": goal, "met": bool(met), "direction": ">=" if at_least else "<="}


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out: Path = args.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    load_start = load_average()
    started = time.perf_counter()
    say(
        f"{cfg.num_requests} requests, prompts {cfg.prompt_len}, outputs {cfg.output_len}; "
        f"multi-turn {cfg.conversations} x {cfg.turns}; quick={cfg.quick}"
    )
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load average {', '.join(f'{x:.2f}' for x in load_start)}"
    )
    if load_start and load_start[0] > 1.5:
        say(f"WARNING: load average {load_start[0]:.2f} > 1.5: timings will be noisy")
    model_dir = ensure_checkpoint(args.model_dir)
    rss_before_model = current_rss_mib()
    t = time.perf_counter()
    model = MoEModel.from_checkpoint(model_dir)
    say(f"loaded our model in {time.perf_counter() - t:.1f}s")
    spec = model.spec
    requests = make_workload(cfg, spec.vocab_size)
    need_blocks = sum(blocks_for(len(r.prompt) + r.max_tokens, cfg.block_size) for r in requests)

    # warm-up: 512 prompt tokens page in every weight and expert; not timed, not reported
    warm_rng = random.Random(cfg.seed + 99)
    warm = [Request(f"w{i}", random_ids(warm_rng, 64, spec.vocab_size), 4) for i in range(8)]
    t = time.perf_counter()
    run_engine("warm-up", model, engine_config(cfg), warm)
    say(f"engine warm-up {time.perf_counter() - t:.1f}s")

    all_at_once = run_engine("ours, all at once", model, engine_config(cfg), requests)
    say(
        f"all at once: {all_at_once.tok_s:.1f} tok/s, wall {all_at_once.wall_s:.1f}s, "
        f"{all_at_once.num_steps} steps, {all_at_once.num_preemptions} preemptions, "
        f"{contention_note(all_at_once.cpu_s, all_at_once.wall_s, all_at_once.load_average)}"
    )
    sustained_rate = cfg.num_requests / all_at_once.wall_s
    rate = cfg.rate if cfg.rate is not None else cfg.load_factor * sustained_rate
    offsets = poisson_offsets(cfg.num_requests, rate, cfg.seed)
    poisson = run_engine(
        f"ours, Poisson {rate:.2f} req/s", model, engine_config(cfg), requests, offsets
    )
    say(
        f"Poisson {rate:.3f} req/s (last arrival {offsets[-1]:.1f}s): {poisson.tok_s:.1f} tok/s, "
        f"wall {poisson.wall_s:.1f}s, {poisson.num_steps} steps, "
        f"{contention_note(poisson.cpu_s, poisson.wall_s, poisson.load_average)}"
    )

    messages, reply_lens = make_conversations(cfg, spec.vocab_size)
    mt_off = run_multiturn(cfg, model, messages, reply_lens, prefix_caching=False)
    say(f"multi-turn, caching off: {mt_off.prompt_tokens_computed} computed, {mt_off.wall_s:.1f}s")
    mt_on = run_multiturn(cfg, model, messages, reply_lens, prefix_caching=True)
    say(f"multi-turn, caching on: {mt_on.prompt_tokens_computed} computed, {mt_on.wall_s:.1f}s")

    del model  # transformers gets the memory to itself
    gc.collect()
    rss_after_release = current_rss_mib()

    t = time.perf_counter()
    hf = load_hf(model_dir)
    say(f"loaded transformers in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    hf_generate(hf, [r.prompt for r in warm[:2]], 4)
    say(f"transformers warm-up {time.perf_counter() - t:.1f}s")
    hf_run = run_hf_static(hf, requests, cfg.hf_batch_size)
    say(
        f"transformers static: {hf_run.tok_s:.1f} useful tok/s, wall {hf_run.wall_s:.1f}s, "
        f"{contention_note(hf_run.cpu_s, hf_run.wall_s, hf_run.load_average)}"
    )

    checks: list[dict[str, Any]] = []
    for r in check_requests(requests, cfg.check_requests):
        n = min(cfg.check_tokens, r.max_tokens)
        reference = hf_generate(hf, [r.prompt], n)[0]
        mismatch = first_mismatch(all_at_once.tokens[r.request_id][:n], reference)
        checks.append(
            {
                "request_id": r.request_id,
                "prompt_len": len(r.prompt),
                "tokens_compared": n,
                "match": mismatch is None,
                "first_mismatch": mismatch,
            }
        )
    checks_ok = all(c["match"] for c in checks)
    say(f"correctness vs transformers unpadded: {checks}")
    wall_total = time.perf_counter() - started

    def cross_match(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, Any]:
        mism = {k: first_mismatch(a[k], b[k]) for k in a}
        return {
            "matching": sum(m is None for m in mism.values()),
            "of": len(mism),
            "first_mismatch": {k: m for k, m in mism.items() if m is not None},
        }

    throughput_ratio = all_at_once.tok_s / hf_run.tok_s
    prefill_ratio = mt_on.prompt_tokens_computed / mt_off.prompt_tokens_computed
    ideal = multiturn_ideal_computed(messages)
    print()
    print(format_table([all_at_once, poisson], hf_run, cfg.hf_batch_size, checks_ok, mt_on, mt_off))
    print()
    report: dict[str, Any] = {
        "benchmark": "engine_throughput",
        "description": "LLMEngine continuous batching (all at once, Poisson arrivals) vs "
        "transformers generate in static padded batches; multi-turn prefix reuse",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "targets": {
            "throughput_vs_transformers": target(throughput_ratio, THROUGHPUT_GOAL, True),
            "multiturn_prefill_ratio": target(prefill_ratio, PREFILL_RATIO_GOAL, False),
        },
        "config": {
            **asdict(cfg),
            "preset": PRESET,
            "model_dir": str(model_dir),
            "model": {
                "family": spec.family.name,
                "hidden_size": spec.hidden_size,
                "num_layers": spec.num_layers,
                "num_experts": spec.num_experts,
                "experts_per_token": spec.num_experts_per_tok,
                "vocab_size": spec.vocab_size,
                "dtype": str(hf.dtype),
            },
            "engine": {
                "block_size": cfg.block_size,
                "kv_cache_bytes": cfg.kv_cache_mib * 2**20,
                "num_blocks": all_at_once.num_blocks,
                "kv_blocks_for_all_requests_at_once": need_blocks,
                "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "enable_prefix_caching": True,
            },
            "multiturn_num_blocks": mt_on.num_blocks,
            "poisson_rate_req_s": rate,
            "poisson_rate_rule": (
                "--rate" if cfg.rate is not None else "load_factor x all-at-once requests/s"
            ),
            "all_at_once_requests_per_s": sustained_rate,
            "poisson_last_arrival_s": offsets[-1],
            "sampling": "greedy, ignore_eos (transformers: eos_token_id=None, do_sample=False)",
            "workload": "random.Random(seed): per request uniform prompt length, ids in "
            f"[{FIRST_ORDINARY_ID}, vocab), uniform max_tokens",
            "throughput": "all output tokens / seconds from t=0 (first submission) to the last "
            "token; transformers: each request's own max_tokens / summed batch wall seconds",
            "ttft": "first token time - scheduled arrival",
            "tpot": "(last token time - first token time) / (n - 1) per request",
            "peak_rss": "VmHWM reset via /proc/self/clear_refs before each phase; one model "
            "loaded at a time",
            "timing": "one warm-up run per engine, then a single timed run per phase",
            "transformers_attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "transformers_experts_implementation": getattr(
                hf.config, "_experts_implementation", None
            ),
        },
        "machine": {
            **machine_facts(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        },
        "results": {
            "ours_all_at_once": engine_run_json(all_at_once),
            "ours_poisson": engine_run_json(poisson),
            "transformers_static": {
                "batch_size": cfg.hf_batch_size,
                "wall_s": hf_run.wall_s,
                "batch_wall_s": hf_run.batch_wall_s,
                "useful_output_tokens": hf_run.useful_tokens,
                "generated_tokens_incl_padding": hf_run.generated_tokens,
                "useful_tok_s": hf_run.tok_s,
                "generated_tok_s": hf_run.generated_tokens / hf_run.wall_s,
                "prompt_tokens": hf_run.prompt_tokens,
                "padded_prompt_tokens": hf_run.padded_prompt_tokens,
                "peak_rss_mib": hf_run.peak_rss_mib,
                **contention_json(hf_run.cpu_s, hf_run.wall_s, hf_run.load_average),
            },
            "multiturn": {
                "prefill_ratio": prefill_ratio,
                "ideal_token_granular_ratio": ideal / mt_off.prompt_tokens_computed,
                "ideal_token_granular_computed": ideal,
                **{
                    f"prefix_caching_{'on' if mt.prefix_caching else 'off'}": {
                        "wall_s": mt.wall_s,
                        "prompt_tokens": mt.prompt_tokens,
                        "prompt_tokens_computed": mt.prompt_tokens_computed,
                        "cached_prompt_tokens_reported": mt.cached_prompt_tokens_reported,
                        "num_blocks": mt.num_blocks,
                        "num_evictions": mt.num_evictions,
                        "num_preemptions": mt.num_preemptions,
                        "mean_ttft_s_per_turn": mt.ttft_s_per_turn,
                        **contention_json(mt.cpu_s, mt.wall_s, mt.load_average),
                    }
                    for mt in (mt_off, mt_on)
                },
                "replies_on_equal_off": cross_match(mt_on.replies, mt_off.replies),
            },
            "correctness": {
                "ours_vs_transformers_unpadded": checks,
                "all_match": checks_ok,
                "poisson_vs_all_at_once": cross_match(poisson.tokens, all_at_once.tokens),
                "transformers_padded_vs_ours": cross_match(hf_run.tokens, all_at_once.tokens),
            },
            "rss_mib": {
                "before_model": rss_before_model,
                "after_releasing_our_model": rss_after_release,
            },
            "bench_wall_s": wall_total,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out} ({wall_total:.0f}s in all)")
    for name, tgt in report["targets"].items():
        status = "met" if tgt["met"] else "NOT met"
        say(f"target {name}: {tgt['value']:.3f} (goal {tgt['direction']} {tgt['goal']}) {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
