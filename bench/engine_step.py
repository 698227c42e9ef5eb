"""Engine step profile: the share of a decode step spent outside torch ops, at batch 1 and 32.

One ``LLMEngine`` on a demo checkpoint (``bench``; ``--quick``: ``tiny``), greedy, no EOS
stop. For each batch size: that many requests (prompts of ``--prompt-len`` random tokens)
are added and stepped until every one is decoding; a few warm-up steps, then ``--steps``
timed decode steps (plain wall time per ``step()``), then ``--steps`` more under
``torch.profiler`` (CPU activities). Inside torch ops = the summed *self* CPU time of every
profiled op (``aten::`` and the other ``ns::op`` events; self times partition the top-level
ops' totals, so nothing is counted twice); outside = profiled wall - inside, as a share of
the profiled wall. The profiler's own per-op cost lands mostly outside, so the share is an
upper bound; compare shares taken the same way, on a machine equally busy (each round
records the load average: other work on the cores inflates the multi-threaded ops more than
the Python between them, so a busy machine shows a smaller share). ``--rounds`` repeats the pair of
measurements per batch size; the figures are medians over rounds.

``--label before`` writes ``bench/results/engine_step.before.json`` (taken before a change);
a run without a label writes ``engine_step.json`` and copies that file's figures in as
``before``, so one file shows both.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine_runs import random_ids
from bench.harness import (
    RESULTS,
    demo_checkpoint,
    load_average,
    median,
    parser,
    quick_or,
    say,
    write_results,
)
from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

WARM_STEPS = 5


def op_self_cpu_s(prof: Any) -> float:
    """Seconds of self CPU time in profiled torch ops (``ns::name`` events)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "::" in e.key) / 1e6


def decoding_engine(model: MoEModel, batch: int, prompt_len: int, steps: int) -> LLMEngine:
    """An engine with ``batch`` requests, all past their prefill, with room for the steps."""
    engine = LLMEngine(model, EngineConfig(num_blocks=batch * (prompt_len + 4 * steps) // 8))
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=3 * steps + WARM_STEPS + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = random_ids(rng, prompt_len, model.spec.vocab_size)
        engine.add_request(EngineRequest(f"b{batch}-{i}", prompt, params))
    scheduler = engine.scheduler
    while scheduler.waiting or any(not seq.output_ids for seq in scheduler.running):
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()
    return engine


def measure(model: MoEModel, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    engine = decoding_engine(model, batch, prompt_len, steps)
    start = time.perf_counter()
    for _ in range(steps):
        assert len(engine.step()) == batch, "every request decodes one token a step"
    plain_s = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        profiled_s = time.perf_counter() - start
    inside_s = op_self_cpu_s(prof)
    engine.abort_all()
    return {
        "step_ms": plain_s * 1e3,
        "profiled_step_ms": profiled_s / steps * 1e3,
        "inside_ops_ms": inside_s / steps * 1e3,
        "outside_ms": (profiled_s - inside_s) / steps * 1e3,
        "outside_share": max(0.0, 1 - inside_s / profiled_s),
        "load_average_1min": load_average(),
    }


def summarize(rounds: list[dict[str, float]]) -> dict[str, Any]:
    keys = rounds[0].keys()
    return {**{k: median([r[k] for r in rounds]) for k in keys}, "rounds": rounds}


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("engine_step", __doc__)
    p.add_argument("--preset", default=None, help="demo checkpoint (default bench; quick: tiny)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="per measurement (default 40; quick 10)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--label", default="", help="'before': write engine_step.before.json")
    args = p.parse_args(argv)
    args.preset = quick_or(args, args.preset, "tiny", "bench")
    steps = args.steps or quick_or(args, None, 10, 40)
    rounds = args.rounds or quick_or(args, None, 1, 3)
    started = time.perf_counter()
    model = MoEModel.from_checkpoint(demo_checkpoint(args.preset))
    figures: dict[str, Any] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        per_round = [measure(model, batch, args.prompt_len, steps) for _ in range(rounds)]
        figures[f"batch_{batch}"] = summarize(per_round)
        f = figures[f"batch_{batch}"]
        say(
            f"batch {batch}: step {f['step_ms']:.1f} ms, outside torch ops "
            f"{f['outside_share']:.1%} (profiled step {f['profiled_step_ms']:.1f} ms)"
        )
    report: dict[str, Any] = {
        "config": {
            "preset": args.preset,
            "prompt_len": args.prompt_len,
            "steps": steps,
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "method": "outside share = 1 - sum of torch.profiler self CPU time of ns::op events "
            "/ wall of the profiled decode steps; medians over rounds",
        },
        "label": args.label,
        "figures": figures,
    }
    suffix = "" if args.preset == "bench" else f".{args.preset}"
    variant = suffix + (f".{args.label}" if args.label else "")
    before = RESULTS / f"engine_step{suffix}.before.json"
    if not args.label and before.is_file():
        old = json.loads(before.read_text())
        report["before"] = {k: old.get(k) for k in ("timestamp", "label", "figures", "note")}
    write_results(args, report, {}, variant, started)


if __name__ == "__main__":
    main()
