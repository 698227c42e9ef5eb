"""Model-core throughput: our in-process generation vs transformers ``generate``, same prompts.

Both engines load one demo checkpoint (``bench``: Mixtral family, hidden 512, 8 layers,
16 experts top-2; ``--quick``: ``tiny``; ``--preset bench-deepseek-v3``: DeepSeek-V3's
shape at the same scale, latent attention and grouped routing) and generate greedily, with
no EOS stop, a fixed number of new tokens for the same fixed-seed random prompts (one length
per batch, so transformers needs no padding). Each (batch size, engine) gets one warm-up run, then
``--repeats`` timed rounds; in each round both engines run once, alternating who goes first,
after a wait for a quiet machine. Throughput is ``batch * new_tokens / wall seconds`` of one
whole generate call (prefill included); the target is the median over rounds of ours /
transformers, each round's pair run back to back. The greedy tokens of the two engines are
compared as a sanity check.

Batch-1 decode is also set against this machine's memory-bandwidth roofline
(``bench.roofline``): each round measures the read bandwidth (after the quiet wait) and
times our decode steps (from the first generated token to the last, so prefill is out);
the share is decode tok/s over ``bandwidth / bytes read per token``, median over rounds.
Each round also times the batch-1 expert kernel alone over slots that no cache holds
(``bench.roofline.ExpertKernelRead``): its share of the same bandwidth is the ceiling the
matmul library sets before any of our code runs.
Writes ``bench/results/model_core.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from bench.harness import (
    FIRST_ORDINARY_ID,
    demo_checkpoint,
    first_mismatch,
    median,
    parser,
    quick_or,
    say,
    target,
    timed,
    wait_for_quiet,
    write_results,
)
from bench.roofline import ExpertKernelRead, decode_bytes_per_token, read_bandwidth
from bench.transformers_runs import hf_generate, load_hf
from cluster.engine.generator import generate
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

RATIO_GOALS = {1: 1.1, 16: 1.2}  # batch size -> ours / transformers tok/s, at least
RATIO_GOAL_OTHER = 1.0
ROOFLINE_GOAL = 0.5  # batch-1 decode tok/s / the bandwidth roofline's, at least


@dataclass
class BatchResult:
    batch_size: int
    generated_tokens: int  # per timed call: batch_size * new_tokens
    times_s: dict[str, list[float]] = field(default_factory=dict)  # engine -> per round
    quiet: list[dict[str, float]] = field(default_factory=list)  # before each round
    first_mismatch: list[int | None] = field(default_factory=list)  # per sequence
    decode_s: list[float] = field(default_factory=list)  # ours, per round: first to last token
    bandwidth: list[dict[str, Any]] = field(default_factory=list)  # per round (batch 1)
    kernel_read: list[dict[str, Any]] = field(default_factory=list)  # per round (batch 1)

    @property
    def decode_tok_s(self) -> list[float]:
        """Our decode throughput (tokens after each sequence's first), round by round."""
        steps = self.generated_tokens // self.batch_size - 1
        return [self.batch_size * steps / s for s in self.decode_s]

    @property
    def ratios(self) -> list[float]:
        """Ours / transformers throughput, round by round."""
        return [h / o for o, h in zip(self.times_s["ours"], self.times_s["hf"], strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "generated_tokens_per_call": self.generated_tokens,
            **{
                name: {
                    "times_s": [round(t, 4) for t in times],
                    "tok_s_median": round(self.generated_tokens / median(times), 2),
                }
                for name, times in self.times_s.items()
            },
            "ratio_by_round": [round(r, 4) for r in self.ratios],
            "ours_decode_tok_s_by_round": [round(t, 2) for t in self.decode_tok_s],
            "sequences_matching": sum(m is None for m in self.first_mismatch),
            "first_mismatch_position": self.first_mismatch,
            "machine_before_each_round": self.quiet,
        }


def make_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Fixed-seed random ordinary ids, all the same length; one stream per batch size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (batch_size, prompt_len), generator=gen)
    return ids.tolist()


def run_ours(
    model: MoEModel, prompts: list[list[int]], new_tokens: int, decode_s: list[float]
) -> list[list[int]]:
    """Generate; append to ``decode_s`` the seconds from the first step's end to the last's."""
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)] * len(
        prompts
    )
    stamps: list[float] = []  # one per generated token, in order
    results = generate(
        model, prompts, params, on_token=lambda *_: stamps.append(time.perf_counter())
    )
    for r in results:
        assert len(r.token_ids) == new_tokens, (len(r.token_ids), r.finish_reason)
    decode_s.append(stamps[-1] - stamps[len(prompts) - 1])  # the first step gives one each
    return [r.token_ids for r in results]


def bench_batch(
    args: Any, batch_size: int, ours: MoEModel, hf: Any, kernel: ExpertKernelRead | None
) -> BatchResult:
    prompts = make_prompts(batch_size, args.prompt_len, ours.spec.vocab_size, args.seed)
    result = BatchResult(batch_size, batch_size * args.new_tokens)
    engines: dict[str, Callable[[], list[list[int]]]] = {
        "ours": lambda: run_ours(ours, prompts, args.new_tokens, result.decode_s),
        "hf": lambda: hf_generate(hf, prompts, args.new_tokens),
    }
    outputs: dict[str, list[list[int]]] = {}
    for name, fn in engines.items():
        warm_s, outputs[name] = timed(fn)
        result.times_s[name] = []
        say(f"batch {batch_size:>2} {name:>4}: warm-up {warm_s:.2f}s")
    result.decode_s.clear()  # the warm-up's
    for rep in range(args.repeats):
        result.quiet.append(wait_for_quiet(args))
        if batch_size == 1:
            result.bandwidth.append(read_bandwidth())
            if kernel is not None:
                result.kernel_read.append(kernel.measure())
        for name in list(engines) if rep % 2 == 0 else list(reversed(engines)):
            seconds, tokens = timed(engines[name])
            assert tokens == outputs[name], f"{name} is not deterministic across runs"
            result.times_s[name].append(seconds)
        say(f"batch {batch_size:>2} round {rep + 1}: ours / transformers {result.ratios[-1]:.3f}")
    pairs = zip(outputs["ours"], outputs["hf"], strict=True)
    result.first_mismatch = [first_mismatch(a, b) for a, b in pairs]
    return result


def roofline_report(args: Any, model: MoEModel, result: BatchResult) -> dict[str, Any]:
    """Batch-1 decode tok/s against ``bandwidth / bytes per token``, round by round."""
    # decode step i (1..n-1) attends over prompt_len + i keys: their mean
    context = args.prompt_len + args.new_tokens / 2
    needed = decode_bytes_per_token(model, context)
    bandwidth = [b["bytes_per_s"] for b in result.bandwidth]
    roofline = [bw / needed["total"] for bw in bandwidth]  # tok/s, per round
    shares = [t / r for t, r in zip(result.decode_tok_s, roofline, strict=True)]
    kernel_bw = [k["bytes_per_s"] for k in result.kernel_read]
    ceiling = [k / bw for k, bw in zip(kernel_bw, bandwidth, strict=True)]
    return {
        "method": (
            "bytes per token: embedding row, every backbone tensor of each layer (norms, "
            "attention, gate), the K chosen experts' weights per MoE layer, K/V read at the mean "
            "decode context, final norm and LM head; bandwidth: median of "
            "sum() reads of a 512 MiB fp32 tensor, measured each round before the engines"
        ),
        "mean_context_keys": context,
        "bytes_per_token": {k: int(v) for k, v in needed.items()},
        "bandwidth_gb_s_by_round": [round(bw / 1e9, 2) for bw in bandwidth],
        "bandwidth_reads_s_by_round": [b["read_s"] for b in result.bandwidth],
        "roofline_tok_s_by_round": [round(r, 1) for r in roofline],
        "decode_tok_s_by_round": [round(t, 2) for t in result.decode_tok_s],
        "share_by_round": [round(x, 4) for x in shares],
        "share_median": median(shares),
        "expert_kernel": {
            "method": (
                "one token through one expert slot's two projections at a time (the matmul "
                "calls alone), over slots of the model's expert shape and layout totalling "
                "256 MiB (every call reads its expert from memory); bytes/s, median of 5 "
                "passes, each round after the sum() reads"
            ),
            "layout": result.kernel_read[0]["layout"] if result.kernel_read else None,
            "bandwidth_gb_s_by_round": [round(k / 1e9, 2) for k in kernel_bw],
            "share_of_read_bandwidth_by_round": [round(c, 4) for c in ceiling],
            "share_of_read_bandwidth_median": median(ceiling) if ceiling else None,
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = parser("model_core", __doc__)
    p.add_argument(
        "--preset",
        default=None,
        help="demo checkpoint (default bench; quick: tiny; bench-deepseek-v3: DeepSeek-V3's shape)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    args = p.parse_args(argv)
    args.preset = quick_or(args, args.preset, "tiny", "bench")
    args.new_tokens = quick_or(args, args.new_tokens, 16, 64)
    args.repeats = quick_or(args, args.repeats, 1, 5)
    if min(args.new_tokens, args.repeats, args.prompt_len, *args.batch_sizes) < 1:
        p.error("--new-tokens, --repeats, --prompt-len and --batch-sizes must be >= 1")
    started = time.perf_counter()
    model_dir = demo_checkpoint(args.preset)
    ours = MoEModel.from_checkpoint(model_dir)
    transformers.utils.logging.disable_progress_bar()
    hf = load_hf(model_dir)
    kernel = ExpertKernelRead(ours) if ours.spec.is_moe and 1 in args.batch_sizes else None
    results = [bench_batch(args, b, ours, hf, kernel) for b in args.batch_sizes]
    header = (
        f"{'batch':>5} | {'ours tok/s':>10} | {'transformers tok/s':>18} | {'ratio':>6} | match"
    )
    print(header)
    for r in results:
        o, h = (r.generated_tokens / median(r.times_s[n]) for n in ("ours", "hf"))
        matching = sum(m is None for m in r.first_mismatch)
        print(
            f"{r.batch_size:>5} | {o:>10.1f} | {h:>18.1f} | {median(r.ratios):>6.2f} | "
            f"{matching}/{r.batch_size}"
        )
    hf_cfg = hf.config
    report: dict[str, Any] = {
        "config": {
            "preset": args.preset,
            "family": ours.spec.family.name,
            "dtype": str(ours.dtype),
            "batch_sizes": args.batch_sizes,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.repeats,
            "seed": args.seed,
            "sampling": "greedy, no EOS stop",
            "transformers_attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
            "transformers_experts_implementation": getattr(hf_cfg, "_experts_implementation", None),
        },
        "results": [r.to_json() for r in results],
    }
    targets = {
        f"throughput_ratio_batch{r.batch_size}": target(
            median(r.ratios), RATIO_GOALS.get(r.batch_size, RATIO_GOAL_OTHER), True
        )
        for r in results
    }
    single = [r for r in results if r.batch_size == 1]
    if single:
        report["roofline_batch1"] = roofline_report(args, ours, single[0])
        share = report["roofline_batch1"]["share_median"]
        targets["decode_roofline_share_batch1"] = target(share, ROOFLINE_GOAL, True)
        print(f"batch-1 decode: {share:.1%} of the memory-bandwidth roofline (median of rounds)")
        ceiling = report["roofline_batch1"]["expert_kernel"]["share_of_read_bandwidth_median"]
        if ceiling is not None:
            print(
                f"the batch-1 expert kernel alone reads at {ceiling:.1%} of that bandwidth "
                "(the matmul library's ceiling on this machine)"
            )
    write_results(
        args, report, targets, "" if args.preset == "bench" else f".{args.preset}", started
    )


if __name__ == "__main__":
    main()
