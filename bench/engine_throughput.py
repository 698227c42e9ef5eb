"""Engine throughput and latency: continuous batching vs transformers static batches, prefix reuse.

All phases use the ``bench`` demo checkpoint (Mixtral family, hidden 512, 8 layers, 16 experts
top-2, vocab 2048; ``--quick``: ``tiny``), greedy decoding with no EOS stop, in one process,
one phase after the other:

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

6. **A small mixed workload** (bench/engine_mixed.py): 24 requests, prompts 32-192 tokens,
   outputs 32-96, where static batches waste little on padding; ours all at once vs
   transformers static batches, ``--mixed-rounds`` rounds each.

Targets: ``throughput_vs_transformers`` = phase-1 tok/s / phase-4 tok/s (goal >= 3.0),
``mixed_throughput_vs_transformers`` = the median over rounds of ours / transformers on the
mixed workload (goal >= 2.0), and ``multiturn_prefill_ratio`` = prompt tokens computed with
prefix caching / without (goal <= 0.2).

Phases 1-4 run one round: they take about 10 minutes on this 2-core machine (a second round
would not fit), so those targets' medians are that round's figures. The JSON records, per
phase, the process CPU seconds per wall second and the load average: well under torch's
thread count means other work shared the cores and the timings are pessimistic. Writes
``bench/results/engine_throughput.json``.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from bench.engine_mixed import MIXED_GOAL, MixedRuns, mixed_config, summary_line
from bench.engine_runs import (
    BenchConfig,
    EngineRun,
    MultiTurnRun,
    Request,
    current_rss_mib,
    engine_config,
    make_conversations,
    make_workload,
    multiturn_ideal_computed,
    poisson_offsets,
    random_ids,
    run_engine,
    run_multiturn,
)
from bench.harness import (
    demo_checkpoint,
    first_mismatch,
    load_average,
    median,
    parser,
    percentile,
    quick_or,
    say,
    target,
    write_results,
)
from bench.transformers_runs import HFRun, check_requests, hf_generate, load_hf, run_hf_static
from cache.block_allocator import blocks_for
from experts.model import MoEModel

THROUGHPUT_GOAL = 3.0  # ours / transformers static batches, at least
PREFILL_RATIO_GOAL = 0.20  # prompt tokens computed with / without prefix caching, at most


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser("engine_throughput", __doc__)
    p.add_argument("--preset", default=None, help="demo checkpoint (default bench; quick: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random workload")
    p.add_argument("--requests", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--load-factor", type=float, default=0.7)
    p.add_argument("--rate", type=float, default=None, help="Poisson rate, requests/s")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="phases 1 and 2")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--mixed-requests", type=int, default=None, help="default 24 (quick: 8)")
    p.add_argument("--mixed-rounds", type=int, default=None, help="default 3 (quick: 1)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    num_requests = args.requests if args.requests is not None else (16 if quick else 64)
    if num_requests < 1 or args.hf_batch_size < 1 or args.kv_cache_mib < 1:
        raise SystemExit("--requests, --hf-batch-size and --kv-cache-mib must be >= 1")
    if not 0 < args.load_factor <= 10 or (args.rate is not None and args.rate <= 0):
        raise SystemExit("--load-factor must be in (0, 10] and --rate > 0")
    args.preset = quick_or(args, args.preset, "tiny", "bench")
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


def contention_note(run: EngineRun | HFRun) -> str:
    load = run.load_average
    return f"wall {run.wall_s:.1f}s, cpu/wall {run.cpu_s / run.wall_s:.2f}, load {load[1]:.2f}"


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


def checks_against_hf(
    cfg: BenchConfig, hf: Any, requests: Sequence[Request], ours: EngineRun
) -> list[dict[str, Any]]:
    """Our all-at-once tokens against transformers' unpadded greedy tokens (not timed)."""
    checks: list[dict[str, Any]] = []
    for r in check_requests(requests, cfg.check_requests):
        n = min(cfg.check_tokens, r.max_tokens)
        mismatch = first_mismatch(ours.tokens[r.request_id][:n], hf_generate(hf, [r.prompt], n)[0])
        checks.append(
            {
                "request_id": r.request_id,
                "prompt_len": len(r.prompt),
                "tokens_compared": n,
                "match": mismatch is None,
                "first_mismatch": mismatch,
            }
        )
    return checks


def cross_match(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, Any]:
    mism = {k: first_mismatch(a[k], b[k]) for k in a}
    return {
        "matching": sum(m is None for m in mism.values()),
        "of": len(mism),
        "first_mismatch": {k: m for k, m in mism.items() if m is not None},
    }


def multiturn_json(mt: MultiTurnRun) -> dict[str, Any]:
    return {k: v for k, v in asdict(mt).items() if k != "replies"}


def hf_json(hf_run: HFRun, batch_size: int) -> dict[str, Any]:
    return {
        "batch_size": batch_size,
        "wall_s": hf_run.wall_s,
        "batch_wall_s": hf_run.batch_wall_s,
        "useful_output_tokens": hf_run.useful_tokens,
        "generated_tokens_incl_padding": hf_run.generated_tokens,
        "useful_tok_s": hf_run.tok_s,
        "prompt_tokens": hf_run.prompt_tokens,
        "padded_prompt_tokens": hf_run.padded_prompt_tokens,
        "peak_rss_mib": hf_run.peak_rss_mib,
        **contention_json(hf_run.cpu_s, hf_run.wall_s, hf_run.load_average),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = make_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    say(
        f"{cfg.num_requests} requests, prompts {cfg.prompt_len}, outputs {cfg.output_len}; "
        f"multi-turn {cfg.conversations} x {cfg.turns}; load average {load_average():.2f}"
    )
    model_dir = demo_checkpoint(args.preset)
    rss_before_model = current_rss_mib()
    model = MoEModel.from_checkpoint(model_dir)
    spec = model.spec
    requests = make_workload(cfg, spec.vocab_size)
    need_blocks = sum(blocks_for(len(r.prompt) + r.max_tokens, cfg.block_size) for r in requests)
    # warm-up: 512 prompt tokens page in every weight and expert; not timed, not reported
    warm_rng = random.Random(cfg.seed + 99)
    warm = [Request(f"w{i}", random_ids(warm_rng, 64, spec.vocab_size), 4) for i in range(8)]
    run_engine("warm-up", model, engine_config(cfg), warm)

    all_at_once = run_engine("ours, all at once", model, engine_config(cfg), requests)
    say(f"all at once: {all_at_once.tok_s:.1f} tok/s, {contention_note(all_at_once)}")
    sustained_rate = cfg.num_requests / all_at_once.wall_s
    rate = cfg.rate if cfg.rate is not None else cfg.load_factor * sustained_rate
    offsets = poisson_offsets(cfg.num_requests, rate, cfg.seed)
    name = f"ours, Poisson {rate:.2f} req/s"
    poisson = run_engine(name, model, engine_config(cfg), requests, offsets)
    say(f"Poisson {rate:.3f} req/s: {poisson.tok_s:.1f} tok/s, {contention_note(poisson)}")
    messages, reply_lens = make_conversations(cfg, spec.vocab_size)
    mt_off = run_multiturn(cfg, model, messages, reply_lens, prefix_caching=False)
    mt_on = run_multiturn(cfg, model, messages, reply_lens, prefix_caching=True)
    say(f"multi-turn: {mt_on.prompt_tokens_computed} of {mt_off.prompt_tokens_computed} computed")
    mixed_rounds = args.mixed_rounds or (1 if cfg.quick else 3)
    mixed_cfg = mixed_config(cfg, args.mixed_requests)
    mixed = MixedRuns(make_workload(mixed_cfg, spec.vocab_size))
    mixed.run_ours(model, mixed_cfg, mixed_rounds)
    del model  # transformers gets the memory to itself
    gc.collect()
    rss_after_release = current_rss_mib()

    hf = load_hf(model_dir)
    hf_generate(hf, [r.prompt for r in warm[:2]], 4)
    hf_run = run_hf_static(hf, requests, cfg.hf_batch_size)
    say(f"transformers static: {hf_run.tok_s:.1f} useful tok/s, {contention_note(hf_run)}")
    mixed.run_hf(hf, cfg.hf_batch_size, mixed_rounds)
    say(summary_line(mixed))
    checks = checks_against_hf(cfg, hf, requests, all_at_once)
    checks_ok = all(c["match"] for c in checks)
    throughput_ratio = all_at_once.tok_s / hf_run.tok_s
    prefill_ratio = mt_on.prompt_tokens_computed / mt_off.prompt_tokens_computed
    print(format_table([all_at_once, poisson], hf_run, cfg.hf_batch_size, checks_ok, mt_on, mt_off))
    report: dict[str, Any] = {
        "config": {
            **asdict(cfg),
            "preset": args.preset,
            "family": spec.family.name,
            "kv_num_blocks": all_at_once.num_blocks,
            "kv_blocks_for_all_requests_at_once": need_blocks,
            "multiturn_num_blocks": mt_on.num_blocks,
            "poisson_rate_req_s": rate,
            "all_at_once_requests_per_s": sustained_rate,
            "poisson_last_arrival_s": offsets[-1],
            "throughput": "all output tokens / seconds from t=0 (first submission) to the last "
            "token; transformers: each request's own max_tokens / summed batch wall seconds",
            "ttft": "first token time - scheduled arrival",
            "tpot": "(last token time - first token time) / (n - 1) per request",
            "rounds": 1,
        },
        "results": {
            "ours_all_at_once": engine_run_json(all_at_once),
            "ours_poisson": engine_run_json(poisson),
            "mixed_workload": {"config": asdict(mixed_cfg), **mixed.to_json(engine_run_json)},
            "transformers_static": hf_json(hf_run, cfg.hf_batch_size),
            "multiturn": {
                "prefill_ratio": prefill_ratio,
                "ideal_token_granular_computed": multiturn_ideal_computed(messages),
                "prefix_caching_off": multiturn_json(mt_off),
                "prefix_caching_on": multiturn_json(mt_on),
                "replies_on_equal_off": cross_match(mt_on.replies, mt_off.replies),
            },
            "correctness": {
                "ours_vs_transformers_unpadded": checks,
                "all_match": checks_ok,
                "poisson_vs_all_at_once": cross_match(poisson.tokens, all_at_once.tokens),
                "transformers_padded_vs_ours": cross_match(hf_run.tokens, all_at_once.tokens),
            },
            "rss_mib": {"before_model": rss_before_model, "after_release": rss_after_release},
        },
    }
    targets = {
        "throughput_vs_transformers": target(throughput_ratio, THROUGHPUT_GOAL, at_least=True),
        "mixed_throughput_vs_transformers": target(median(mixed.ratios), MIXED_GOAL, at_least=True),
        "multiturn_prefill_ratio": target(prefill_ratio, PREFILL_RATIO_GOAL, at_least=False),
    }
    variant = "" if args.preset == "bench" else f".{args.preset}"
    write_results(args, report, targets, variant, started)


if __name__ == "__main__":
    main()
