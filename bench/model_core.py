"""Model-core throughput: our in-process generation vs transformers ``generate``, same prompts.

Both engines load the ``bench`` demo checkpoint (Mixtral family, hidden 512, 8 layers,
16 experts top-2, vocab 2048; built into ``.demo-models/bench`` on first use) and generate
greedily, with no EOS stop, a fixed number of new tokens for the same fixed-seed random
prompts (one length per batch, so transformers needs no padding).

Timing: each (batch size, engine) gets one warm-up run, then at least ``--repeats`` timed runs,
interleaving the engines (alternating who goes first) so that machine noise hits both alike.
While an engine's fastest run is not confirmed by a second one within ``--confirm`` (10%),
more repeats follow, up to ``--max-repeats``. Before each timed run the script waits (up to
``--quiet-wait`` seconds) for other processes to leave the CPUs mostly idle. Throughput is
``batch * new_tokens / wall seconds`` of one whole generate call (prefill included), from the
**best** (fastest) repeat: noise only ever slows a run down, so on a shared machine the
fastest run is the closest estimate of what the code can do. Medians are recorded too.

As a sanity check (not a timing), the greedy tokens of the two engines are compared for the
measured prompts and the match is reported in the table and the JSON.

Run: ``.venv/bin/python bench/model_core.py`` (full, ~2-3 minutes on a quiet 2-core machine)
or ``--quick`` (smoke run). Writes ``bench/results/model_core.json`` (quick:
``model_core.quick.json``, so a smoke run never overwrites the full figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

# run as `python bench/model_core.py`, the script's folder is on the path, not the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import load_average, wait_for_quiet
from cluster.engine.generator import generate
from deploy.demo_model import build_demo_model, is_demo_model
from experts.model import MoEModel
from experts.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".demo-models" / "bench"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "model_core.json"
QUICK_OUT = REPO_ROOT / "bench" / "results" / "model_core.quick.json"  # keeps the full run's file
PRESET = "bench"
FIRST_ORDINARY_ID = 3  # ids 0..2 are <s>, </s>, <pad> in every demo preset
RATIO_GOAL = 1.0


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    repeats: int
    max_repeats: int
    confirm: float
    seed: int
    quick: bool
    quiet_wait_s: float
    quiet_threshold: float


@dataclass
class EngineRun:
    """Timings of one engine at one batch size (seconds per whole generate call)."""

    warmup_s: float
    times_s: list[float] = field(default_factory=list)
    load_1m: list[float] = field(default_factory=list)  # 1-min load average before each run
    busy_before: list[float] = field(default_factory=list)  # CPU busy share just before each run
    waited_s: list[float] = field(default_factory=list)  # seconds spent waiting for quiet

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


@dataclass
class BatchResult:
    batch_size: int
    generated_tokens: int  # per timed call: batch_size * new_tokens
    ours: EngineRun
    hf: EngineRun
    sequences_matching: int
    first_mismatch: list[int | None]  # per sequence: first differing position, None if equal

    @property
    def ours_tok_s(self) -> float:
        return self.generated_tokens / self.ours.best_s

    @property
    def hf_tok_s(self) -> float:
        return self.generated_tokens / self.hf.best_s

    @property
    def ratio(self) -> float:
        return self.ours_tok_s / self.hf_tok_s

    @property
    def tokens_match(self) -> bool:
        return self.sequences_matching == self.batch_size


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, 1 repeat")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {DEFAULT_OUT} (quick: {QUICK_OUT.name})"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument(
        "--max-repeats", type=int, default=None, help="default 6 (quick: as --repeats)"
    )
    parser.add_argument(
        "--confirm",
        type=float,
        default=0.10,
        help="repeat (up to --max-repeats) until each engine's two fastest runs are within this "
        "relative gap, so one lucky or one disturbed run does not decide alone",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each timed run, wait up to this many seconds for other processes to leave "
        "the CPUs under --quiet-threshold busy (default 20; quick: 0)",
    )
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.quick else 64)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    default_max = repeats if args.quick else max(repeats, 6)
    max_repeats = args.max_repeats if args.max_repeats is not None else default_max
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 20.0)
    if new_tokens < 1 or repeats < 1 or args.prompt_len < 1 or min(args.batch_sizes) < 1:
        raise SystemExit("--new-tokens, --repeats, --prompt-len and --batch-sizes must be >= 1")
    if max_repeats < repeats:
        raise SystemExit(f"--max-repeats ({max_repeats}) must be >= --repeats ({repeats})")
    return BenchConfig(
        batch_sizes=tuple(args.batch_sizes),
        prompt_len=args.prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        max_repeats=max_repeats,
        confirm=args.confirm,
        seed=args.seed,
        quick=args.quick,
        quiet_wait_s=quiet_wait,
        quiet_threshold=args.quiet_threshold,
    )


def say(msg: str) -> None:
    print(f"[model_core] {msg}", flush=True)


def ensure_checkpoint(model_dir: Path) -> Path:
    """The bench checkpoint, built on first use (with progress) and reused afterwards."""
    if is_demo_model(model_dir) and (model_dir / "config.json").is_file():
        say(f"using cached checkpoint {model_dir}")
        return model_dir
    say(f"building the {PRESET!r} demo checkpoint into {model_dir} (once; ~1 GB)")
    return build_demo_model(model_dir, preset=PRESET, progress=lambda m: say(f"  build: {m}"))


def make_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Fixed-seed random ids in [3, vocab), all the same length; one stream per batch size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (batch_size, prompt_len), generator=gen)
    return ids.tolist()


def run_ours(model: MoEModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)] * len(
        prompts
    )
    results = generate(model, prompts, params)
    for r in results:
        assert len(r.token_ids) == new_tokens, (len(r.token_ids), r.finish_reason)
    return [r.token_ids for r in results]


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers ``generate`` (``model`` is a ``PreTrainedModel``; typed Any for its mixins)."""
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    input_ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    generated = out[:, input_ids.shape[1] :]
    assert generated.shape[1] == new_tokens, tuple(generated.shape)
    return [list(map(int, row)) for row in generated.tolist()]


def is_confirmed(times: Sequence[float], tolerance: float) -> bool:
    """True if the fastest run has a second one within ``tolerance`` of it."""
    if len(times) < 2:
        return False
    fastest, second = sorted(times)[:2]
    return second <= fastest * (1.0 + tolerance)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    for pos, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return pos
    return None


def bench_batch(
    cfg: BenchConfig,
    batch_size: int,
    ours: MoEModel,
    hf: transformers.PreTrainedModel,
) -> BatchResult:
    prompts = make_prompts(batch_size, cfg.prompt_len, ours.spec.vocab_size, cfg.seed)
    engines: dict[str, Callable[[], list[list[int]]]] = {
        "ours": lambda: run_ours(ours, prompts, cfg.new_tokens),
        "hf": lambda: run_hf(hf, prompts, cfg.new_tokens),
    }
    runs: dict[str, EngineRun] = {}
    outputs: dict[str, list[list[int]]] = {}
    for name, fn in engines.items():
        warm_s, outputs[name] = timed(fn)
        runs[name] = EngineRun(warmup_s=warm_s)
        say(f"batch {batch_size:>2} {name:>4}: warm-up {warm_s:.2f}s")
    for rep in range(cfg.max_repeats):
        if rep >= cfg.repeats and all(is_confirmed(r.times_s, cfg.confirm) for r in runs.values()):
            break
        # alternate who goes first, so slow drift of the machine does not favour one engine
        order = list(engines) if rep % 2 == 0 else list(reversed(engines))
        for name in order:
            busy, waited = wait_for_quiet(cfg.quiet_wait_s, cfg.quiet_threshold)
            load = load_average()
            seconds, tokens = timed(engines[name])
            assert tokens == outputs[name], f"{name} is not deterministic across runs"
            runs[name].times_s.append(seconds)
            runs[name].load_1m.append(load)
            runs[name].busy_before.append(busy)
            runs[name].waited_s.append(waited)
            say(
                f"batch {batch_size:>2} {name:>4}: repeat {rep + 1} {seconds:.2f}s "
                f"(others' CPU use before: {busy:.0%}, waited {waited:.1f}s)"
            )
    mismatches = [first_mismatch(a, b) for a, b in zip(outputs["ours"], outputs["hf"], strict=True)]
    return BatchResult(
        batch_size=batch_size,
        generated_tokens=batch_size * cfg.new_tokens,
        ours=runs["ours"],
        hf=runs["hf"],
        sequences_matching=sum(m is None for m in mismatches),
        first_mismatch=mismatches,
    )


def format_table(results: Sequence[BatchResult]) -> str:
    header = (
        f"{'batch':>5} | {'ours tok/s':>10} | {'transformers tok/s':>18} | {'ratio':>6} | "
        f"{'tokens match':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        match = "yes" if r.tokens_match else f"{r.sequences_matching}/{r.batch_size} seqs"
        lines.append(
            f"{r.batch_size:>5} | {r.ours_tok_s:>10.1f} | {r.hf_tok_s:>18.1f} | "
            f"{r.ratio:>6.2f} | {match:>12}"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "transformers": transformers.__version__,
    }


def engine_json(run: EngineRun, generated_tokens: int) -> dict[str, Any]:
    return {
        "warmup_s": run.warmup_s,
        "times_s": run.times_s,
        "best_s": run.best_s,
        "median_s": run.median_s,
        "tok_s_best": generated_tokens / run.best_s,
        "tok_s_median": generated_tokens / run.median_s,
        "load_1m_before_each": run.load_1m,
        "cpu_busy_before_each": run.busy_before,
        "quiet_wait_s_before_each": run.waited_s,
    }


def to_json(
    cfg: BenchConfig,
    model_dir: Path,
    ours: MoEModel,
    hf: transformers.PreTrainedModel,
    results: Sequence[BatchResult],
) -> dict[str, Any]:
    spec = ours.spec
    hf_cfg = hf.config
    return {
        "benchmark": "model_core",
        "description": "greedy generation tok/s: ours (cluster.engine.generator.generate) vs "
        "transformers generate, same prompts, same checkpoint, same process",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            **asdict(cfg),
            "preset": PRESET,
            "model_dir": str(model_dir),
            "statistic": "best (fastest) of repeats; medians also recorded",
            "repeat_rule": f"at least {cfg.repeats}, then more (up to {cfg.max_repeats}) while "
            f"an engine's two fastest runs differ by more than {cfg.confirm:.0%}",
            "throughput": "batch_size * new_tokens / wall seconds of one whole generate call "
            "(prefill included)",
            "warmup_runs_per_engine_per_batch": 1,
            "engine_order": "interleaved per repeat, alternating which goes first",
            "sampling": "greedy, no EOS stop (ours: ignore_eos=True; transformers: "
            "eos_token_id=None, do_sample=False)",
            "prompts": f"torch.Generator(seed * 1000003 + batch_size) random ids in "
            f"[{FIRST_ORDINARY_ID}, vocab), same length within a batch (no padding)",
            "model": {
                "family": spec.family.name,
                "hidden_size": hf_cfg.hidden_size,
                "num_layers": hf_cfg.num_hidden_layers,
                "num_experts": getattr(hf_cfg, "num_local_experts", None),
                "experts_per_token": getattr(hf_cfg, "num_experts_per_tok", None),
                "intermediate_size": hf_cfg.intermediate_size,
                "vocab_size": hf_cfg.vocab_size,
                "dtype": str(ours.dtype),
            },
            "transformers_attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
            "transformers_experts_implementation": getattr(hf_cfg, "_experts_implementation", None),
        },
        "machine": machine_facts(),
        "results": [
            {
                "batch_size": r.batch_size,
                "generated_tokens_per_call": r.generated_tokens,
                "ours": engine_json(r.ours, r.generated_tokens),
                "transformers": engine_json(r.hf, r.generated_tokens),
                "ratio": r.ratio,
                "ratio_median": r.hf.median_s / r.ours.median_s,
                "tokens_match": r.tokens_match,
                "sequences_matching": r.sequences_matching,
                "first_mismatch_position": r.first_mismatch,
            }
            for r in results
        ],
        "targets": {
            f"throughput_ratio_batch{r.batch_size}": {
                "value": r.ratio,
                "goal": RATIO_GOAL,
                "met": r.ratio >= RATIO_GOAL,
            }
            for r in results
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    out: Path = args.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    say(
        f"batch sizes {list(cfg.batch_sizes)}, prompt {cfg.prompt_len} tokens, "
        f"{cfg.new_tokens} new tokens, {cfg.repeats}-{cfg.max_repeats} repeats (+1 warm-up), "
        "best of repeats"
    )
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    model_dir = ensure_checkpoint(args.model_dir)
    t0 = time.perf_counter()
    ours = MoEModel.from_checkpoint(model_dir)
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    say(f"loaded both engines in {time.perf_counter() - t0:.1f}s")
    results = [bench_batch(cfg, b, ours, hf) for b in cfg.batch_sizes]
    print()
    print(format_table(results))
    print()
    report = to_json(cfg, model_dir, ours, hf, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}")
    for name, target in report["targets"].items():
        status = "met" if target["met"] else "NOT met"
        say(f"target {name}: {target['value']:.2f} (goal >= {target['goal']}) {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
