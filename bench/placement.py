"""Expert placement: our planner (router/placement/) against EPLB's algorithm, and a simulation.

Everything runs in one process, seeded; EPLB is ``bench/eplb_reference.py`` (its global
policy, reimplemented from the published description). Loads are the expected token counts
of a window of ``WINDOW_TOKENS`` routed tokens over Zipf popularity (``1 / rank^s``, ranks
shuffled per layer), no sampling noise. **5% drift** (the next window): every expert's load
times ``exp(0.05 z)``, ``z`` standard normal, renormalised to the same total (the total-
variation distance this gives is recorded per case).

1. **Cases**: Zipf exponents 0.6, 1.0, 1.4 on 64 experts / 8 shards (one node) and 256
   experts / 32 shards over 4 nodes, with 0, 12.5, 25 and 50% extra slots, ``--layers``
   layers each. Per case: balancedness (mean over layers of max / mean shard load) of ours
   and of EPLB, also scored on the next window's loads; then a re-plan on the next window:
   ours from its current plan, EPLB from scratch (as it always does), and ours from scratch,
   with the share of all slots each moved.
2. **Planning time** at 58 layers x 256 experts x 288 slots (32 shards over 4 nodes, Zipf
   1.0): EPLB planning the drifted matrix against ours re-planning it from its current plan
   (ours from scratch is recorded too); ``--rounds`` rounds, interleaved, medians.
3. **A simulation** (labelled so in the output and the results) of 64 GPUs holding 256
   experts in 5 slots each (25% extra), 8 per node, ``SIM_LAYERS`` MoE layers, routed tokens
   drawn each step (multinomial) from Zipf-1.0 popularity whose log-weights drift (a mean-
   reverting random walk). A shard's time for a layer is ``c0 + c1 * tokens``; a step is the
   sum over layers of the slowest shard. ``c1`` and part of ``c0`` come from a short
   measurement here of one expert FFN (hidden 512, intermediate 1024, fp32, one thread, the
   ``bench`` demo preset's expert) at several token counts, the rest of ``c0`` from the no-op
   dispatch round trip in ``bench/results/dispatch.json``; copying a slot takes its bytes over
   26 GB/s (memory read bandwidth in shared/MEASURED.md). Policies: no replication
   (round-robin, static); interval re-planning as vLLM does by default (every 3000 steps,
   EPLB from scratch on the last 1000 steps, serving stalled while the slots copy); ours
   (every 100 steps, re-plan from the current plan when the last 1000 steps' balancedness
   is over 1.05, no sooner than 300 steps after the last, applied only when it gains 0.02;
   slots copy in the background, steps 5% slower meanwhile, an assumption).

Targets: ``balancedness_vs_eplb_worst`` (ours / EPLB, worst case, <= 1.0),
``balancedness_zipf1_25pct`` (64 experts, 8 shards, <= 1.05), ``moved_slots_share_5pct_drift``
(ours, worst case, <= 0.10), ``planning_time_vs_eplb`` (ours re-plan / EPLB, median of
rounds, <= 0.1), ``sim_p99_vs_no_replication`` (<= 0.7), ``sim_p99_vs_interval`` (< 1.0).
The live re-plan target (max step time during a re-plan <= 1.5x the median step) is measured
elsewhere, with the placement controller, not here. Writes
``bench/results/placement.json``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.eplb_reference import rebalance_experts
from bench.harness import RESULTS, median, parser, percentile, quick_or, say, target, write_results
from router.placement import PlacementPlan, layer_balancedness, plan_placement

WINDOW_TOKENS = 1_000_000  # routed tokens per window and layer
DRIFT = 0.05
EXPONENTS = (0.6, 1.0, 1.4)
EXTRAS = (0.0, 0.125, 0.25, 0.5)
SIZES = ((64, 8, 1), (256, 32, 4))  # experts, shards, nodes
TIMING = (58, 256, 32, 9, 4)  # layers, experts, shards, slots per shard, nodes
GOALS = {
    "balancedness_vs_eplb_worst": 1.0,
    "balancedness_zipf1_25pct": 1.05,
    "moved_slots_share_5pct_drift": 0.10,
    "planning_time_vs_eplb": 0.1,
    "sim_p99_vs_no_replication": 0.7,
}
SIM_GPUS, SIM_EXPERTS, SIM_SLOTS, SIM_NODES, SIM_LAYERS = 64, 256, 5, 8, 4
SIM_TOKENS = 64 * 16 * 8  # routed per layer and step: 16 tokens per GPU, top-8
SIM_TICK = 100  # steps per popularity update and per check of ours
SIM_DRIFT = 0.05  # std of the log-weight step per tick
SIM_REVERT = 0.01  # pull of the log-weights back to their Zipf start per tick
EXPERT_SHAPE = (512, 1024)  # hidden, intermediate of the measured expert
COPY_BYTES_PER_S = 26e9  # MEASURED.md: memory read bandwidth, one torch thread


Layers = list[list[list[int]]]  # [L][G] -> expert ids


def parse_args(argv: Sequence[str] | None) -> Any:
    p = parser("placement", __doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="layers per case (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="planning-time rounds (default 5)")
    p.add_argument("--sim-steps", type=int, default=None, help="simulated steps (default 30000)")
    args = p.parse_args(argv)
    args.layers = quick_or(args, args.layers, 4, 16)
    args.rounds = quick_or(args, args.rounds, 2, 5)
    args.sim_steps = quick_or(args, args.sim_steps, 6000, 30000)
    return args


# ----------------------------------------------------------------------------- loads


def zipf_load(num_experts: int, exponent: float, rng: random.Random) -> list[float]:
    """Expected tokens per expert for one window: Zipf popularity, ranks shuffled."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
    rng.shuffle(weights)
    total = sum(weights)
    return [WINDOW_TOKENS * x / total for x in weights]


def drift(row: list[float], rng: random.Random, sigma: float = DRIFT) -> list[float]:
    """The next window: each load times exp(sigma * z), renormalised to the same total."""
    moved = [x * math.exp(sigma * rng.gauss(0.0, 1.0)) for x in row]
    scale = sum(row) / sum(moved)
    return [x * scale for x in moved]


def total_variation(a: list[float], b: list[float]) -> float:
    sa, sb = sum(a), sum(b)
    return 0.5 * sum(abs(x / sa - y / sb) for x, y in zip(a, b, strict=True))


def balancedness(layers: Sequence[Sequence[Sequence[int]]], load: list[list[float]]) -> float:
    """Mean over layers of max / mean shard load (any placement, EPLB's duplicates too)."""
    return statistics.fmean(layer_balancedness(s, row) for s, row in zip(layers, load, strict=True))


def moved(
    before: Sequence[Sequence[Sequence[int]]], after: Sequence[Sequence[Sequence[int]]]
) -> int:
    """Slots the shards must load: per shard, what ``after`` holds beyond ``before`` (multisets)."""
    out = 0
    for old_layer, new_layer in zip(before, after, strict=True):
        for old, new in zip(old_layer, new_layer, strict=True):
            out += sum((Counter(new) - Counter(old)).values())
    return out


# ----------------------------------------------------------------------------- 1. cases


def run_case(
    experts: int, shards: int, nodes: int, exponent: float, extra: float, args: Any
) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}/{experts}/{exponent}/{extra}")
    slots = round(experts * (1 + extra)) // shards
    load = [zipf_load(experts, exponent, rng) for _ in range(args.layers)]
    nxt = [drift(row, rng) for row in load]
    ours = plan_placement(load, shards, slots, num_nodes=nodes)
    eplb = rebalance_experts(load, shards, slots)
    replan = plan_placement(nxt, shards, slots, num_nodes=nodes, current=ours)
    eplb_next = rebalance_experts(nxt, shards, slots)
    scratch = plan_placement(nxt, shards, slots, num_nodes=nodes)
    capacity = args.layers * shards * slots
    ours_b, eplb_b = ours.balancedness, balancedness(eplb, load)
    return {
        "experts": experts,
        "shards": shards,
        "nodes": nodes,
        "zipf": exponent,
        "extra": extra,
        "slots_per_shard": slots,
        "drift_total_variation": round(
            statistics.fmean(total_variation(a, b) for a, b in zip(load, nxt, strict=True)), 4
        ),
        "balancedness": {
            "ours": round(ours_b, 4),
            "eplb": round(eplb_b, 4),
            "ratio": round(ours_b / eplb_b, 4),
        },
        "next_window": {
            "ours": round(balancedness(ours.layers, nxt), 4),
            "eplb": round(balancedness(eplb, nxt), 4),
        },
        "replan": {
            "ours_balancedness": round(replan.balancedness, 4),
            "eplb_balancedness": round(balancedness(eplb_next, nxt), 4),
            "ours_moved_share": round(replan.moved_slots / capacity, 4),
            "eplb_moved_share": round(moved(eplb, eplb_next) / capacity, 4),
            "ours_from_scratch_moved_share": round(
                moved(ours.layers, scratch.layers) / capacity, 4
            ),
        },
    }


def print_cases(cases: list[dict[str, Any]]) -> None:
    print("Balancedness (max / mean shard load, mean over layers) and slots moved per re-plan")
    print("  columns: ours, EPLB, ratio | next window: ours, EPLB | moved share per re-plan: ours,")
    print("  EPLB, ours from scratch | ours after the re-plan")
    print(f"{'E/G/N':>10} {'zipf':>4} {'extra':>5} | balancedness | next window | moved | re-plan")
    for c in cases:
        b, n, r = c["balancedness"], c["next_window"], c["replan"]
        size = f"{c['experts']}/{c['shards']}/{c['nodes']}"
        print(
            f"{size:>10} {c['zipf']:>4} {c['extra']:>5.3f} | "
            f"{b['ours']:>7.4f} {b['eplb']:>7.4f} {b['ratio']:>6.4f} | "
            f"{n['ours']:>7.4f} {n['eplb']:>7.4f} | {r['ours_moved_share']:>5.3f} "
            f"{r['eplb_moved_share']:>5.3f} {r['ours_from_scratch_moved_share']:>5.3f} | "
            f"{r['ours_balancedness']:>7.4f}"
        )


# ----------------------------------------------------------------------------- 2. timing


def planning_time(args: Any) -> dict[str, Any]:
    layers, experts, shards, slots, nodes = TIMING
    rounds = []
    for r in range(args.rounds):
        rng = random.Random(f"{args.seed}/timing/{r}")
        load = [zipf_load(experts, 1.0, rng) for _ in range(layers)]
        current = plan_placement(load, shards, slots, num_nodes=nodes)
        nxt = [drift(row, rng) for row in load]
        times: dict[str, float] = {}
        names = ["eplb", "ours_replan", "ours_from_scratch"]
        for name in names[r % 3 :] + names[: r % 3]:
            start = time.perf_counter()
            if name == "eplb":
                rebalance_experts(nxt, shards, slots)
            else:
                replan = name == "ours_replan"
                plan_placement(
                    nxt, shards, slots, num_nodes=nodes, current=current if replan else None
                )
            times[name] = time.perf_counter() - start
        rounds.append({k: round(v * 1000, 2) for k, v in times.items()})
        say(
            f"planning time round {r + 1}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in rounds[-1].items())
        )
    ratio = [x["ours_replan"] / x["eplb"] for x in rounds]
    scratch = [x["ours_from_scratch"] / x["eplb"] for x in rounds]
    return {
        "matrix": {
            "layers": layers,
            "experts": experts,
            "shards": shards,
            "slots": shards * slots,
            "nodes": nodes,
            "zipf": 1.0,
        },
        "rounds_ms": rounds,
        "median_ms": {k: round(median([x[k] for x in rounds]), 2) for k in rounds[0]},
        "ours_replan_vs_eplb_by_round": [round(x, 4) for x in ratio],
        "ours_replan_vs_eplb": round(median(ratio), 4),
        "ours_from_scratch_vs_eplb": round(median(scratch), 4),
    }


# ----------------------------------------------------------------------------- 3. simulation


def calibrate() -> dict[str, Any]:
    """``c0``, ``c1`` (seconds) for one shard call: an expert-FFN measurement + dispatch no-op."""
    import json

    import torch

    torch.set_num_threads(1)
    hidden, inter = EXPERT_SHAPE
    gen = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(inter, hidden, generator=gen) * 0.02 for _ in range(2))
    w2 = torch.randn(hidden, inter, generator=gen) * 0.02
    sizes, medians = (1, 16, 64, 128, 256), []
    for tokens in sizes:
        x = torch.randn(tokens, hidden, generator=gen)
        samples = []
        for _ in range(30):
            start = time.perf_counter()
            h = torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)
            _ = h @ w2.T
            samples.append(time.perf_counter() - start)
        medians.append(statistics.median(samples[5:]))
    mean_t, mean_y = statistics.fmean(sizes), statistics.fmean(medians)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(sizes, medians, strict=True)) / sum(
        (t - mean_t) ** 2 for t in sizes
    )
    intercept = max(mean_y - slope * mean_t, 0.0)
    noop_ms, source = 1.86, "default (dispatch.json unreadable)"
    try:
        dispatch = json.loads((RESULTS / "dispatch.json").read_text())
        at_32 = [r for r in dispatch["layer"]["results"] if r["num_tokens"] == 32]
        noop_ms, source = (
            float(at_32[0]["noop"]["median_ms"]),
            "bench/results/dispatch.json noop, 32 tokens",
        )
    except (OSError, KeyError, IndexError, ValueError):
        pass
    return {
        "c0_s": intercept + noop_ms / 1000,
        "c1_s": slope,
        "ffn_ms_by_tokens": {t: round(y * 1000, 4) for t, y in zip(sizes, medians, strict=True)},
        "ffn_intercept_ms": round(intercept * 1000, 4),
        "dispatch_noop_ms": noop_ms,
        "dispatch_noop_source": source,
        "slot_bytes": 3 * hidden * inter * 4,
        "copy_bytes_per_s": COPY_BYTES_PER_S,
        "copy_source": "shared/MEASURED.md memory read bandwidth (26 GB/s)",
    }


def _matrix(layers: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """[L][E][G] share of each expert's tokens each shard takes (1 / replicas)."""
    out = np.zeros((len(layers), SIM_EXPERTS, SIM_GPUS))
    for i, shards in enumerate(layers):
        for g, held in enumerate(shards):
            for e in held:
                out[i, e, g] += 1.0
        counts = out[i].sum(axis=1, keepdims=True)
        out[i] /= np.maximum(counts, 1.0)
    return out


def _copy_s(
    before: Sequence[Sequence[Sequence[int]]],
    after: Sequence[Sequence[Sequence[int]]],
    cal: dict[str, Any],
) -> tuple[float, int]:
    """Seconds to copy the new slots (GPUs copy in parallel: the busiest one), slots moved."""
    per_gpu = [0] * SIM_GPUS
    for old_layer, new_layer in zip(before, after, strict=True):
        for g, (old, new) in enumerate(zip(old_layer, new_layer, strict=True)):
            per_gpu[g] += sum((Counter(new) - Counter(old)).values())
    return max(per_gpu) * cal["slot_bytes"] / cal["copy_bytes_per_s"], sum(per_gpu)


def _window_balancedness(window: np.ndarray, matrix: np.ndarray) -> float:
    loads = np.einsum("le,leg->lg", window, matrix)
    means = loads.mean(axis=1)
    return float(np.mean(loads.max(axis=1) / np.maximum(means, 1e-12)))


def simulate(args: Any, cal: dict[str, Any]) -> dict[str, Any]:
    """Step times of the three policies on the same drawn tokens (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    ranks = np.arange(1, SIM_EXPERTS + 1, dtype=float)
    base = np.stack([np.log(rng.permutation(1.0 / ranks)) for _ in range(SIM_LAYERS)])  # [L][E]
    logw = base.copy()
    c0, c1 = cal["c0_s"], cal["c1_s"]
    start_load = (
        np.exp(logw) / np.exp(logw).sum(axis=1, keepdims=True) * 1000 * SIM_TOKENS
    ).tolist()
    round_robin = [
        [[e for e in range(SIM_EXPERTS) if e % SIM_GPUS == g] for g in range(SIM_GPUS)]
    ] * SIM_LAYERS
    plans: dict[str, Any] = {
        "no_replication": round_robin,
        "interval": rebalance_experts(start_load, SIM_GPUS, SIM_SLOTS),
        "ours": plan_placement(start_load, SIM_GPUS, SIM_SLOTS, num_nodes=SIM_NODES),
    }
    matrices = {
        name: _matrix(p.layers if isinstance(p, PlacementPlan) else p) for name, p in plans.items()
    }
    steps: dict[str, list[float]] = {name: [] for name in plans}
    stall = {name: 0.0 for name in plans}
    moved_total = {name: 0 for name in plans}
    replans = {name: 0 for name in plans}
    pending: tuple[float, PlacementPlan] | None = None  # ours: copy seconds left, plan
    last_ours = 0
    history: list[np.ndarray] = []  # per tick [L][E] token sums
    ticks = args.sim_steps // SIM_TICK
    for tick in range(ticks):
        logw += SIM_REVERT * (base - logw) + SIM_DRIFT * rng.standard_normal(logw.shape)
        p = np.exp(logw)
        p /= p.sum(axis=1, keepdims=True)
        tokens = np.stack(
            [rng.multinomial(SIM_TOKENS, p[i], size=SIM_TICK) for i in range(SIM_LAYERS)], axis=1
        )  # [T][L][E]
        for name, matrix in matrices.items():
            per_shard = np.einsum("tle,leg->tlg", tokens, matrix)
            step_s = (c0 + c1 * per_shard).max(axis=2).sum(axis=1)  # [T]
            if name == "ours" and pending is not None:
                step_s = step_s * 1.05
            steps[name].extend(step_s.tolist())
        history.append(tokens.sum(axis=0))
        window = np.sum(history[-10:], axis=0)  # the last 1000 steps
        step_no = (tick + 1) * SIM_TICK
        if pending is not None:  # ours copies in the background
            left = pending[0] - float(np.sum(steps["ours"][-SIM_TICK:]))
            if left <= 0:
                plans["ours"], matrices["ours"] = pending[1], _matrix(pending[1].layers)
                pending = None
            else:
                pending = (left, pending[1])
        if step_no % 3000 == 0:  # vLLM's default cadence, from scratch, blocking
            new = rebalance_experts(window.tolist(), SIM_GPUS, SIM_SLOTS)
            seconds, count = _copy_s(plans["interval"], new, cal)
            steps["interval"][-1] += seconds
            stall["interval"] += seconds
            moved_total["interval"] += count
            replans["interval"] += 1
            plans["interval"], matrices["interval"] = new, _matrix(new)
        if pending is None and step_no - last_ours >= 300 and step_no >= 1000:
            now = _window_balancedness(window, matrices["ours"])
            if now > 1.05:
                new_plan = plan_placement(
                    window.tolist(), SIM_GPUS, SIM_SLOTS, num_nodes=SIM_NODES, current=plans["ours"]
                )
                if now - new_plan.balancedness >= 0.02:
                    seconds, count = _copy_s(plans["ours"].layers, new_plan.layers, cal)
                    pending = (seconds, new_plan)
                    moved_total["ours"] += count
                    replans["ours"] += 1
                    last_ours = step_no
    summary = {}
    for name, values in steps.items():
        summary[name] = {
            "p50_ms": round(percentile(values, 50) * 1000, 3),
            "p99_ms": round(percentile(values, 99) * 1000, 3),
            "max_ms": round(max(values) * 1000, 3),
            "mean_ms": round(statistics.fmean(values) * 1000, 3),
            "stall_s": round(stall[name], 3),
            "replans": replans[name],
            "slots_moved": moved_total[name],
        }
    return {
        "label": "simulation",
        "gpus": SIM_GPUS,
        "experts": SIM_EXPERTS,
        "slots_per_gpu": SIM_SLOTS,
        "nodes": SIM_NODES,
        "layers": SIM_LAYERS,
        "steps": ticks * SIM_TICK,
        "routed_tokens_per_layer_step": SIM_TOKENS,
        "zipf": 1.0,
        "drift": {
            "log_weight_std_per_tick": SIM_DRIFT,
            "revert_per_tick": SIM_REVERT,
            "tick_steps": SIM_TICK,
        },
        "calibration": cal,
        "policies": summary,
    }


def print_sim(sim: dict[str, Any]) -> None:
    print(
        f"SIMULATION: {sim['gpus']} GPUs, {sim['experts']} experts, {sim['steps']} steps, "
        "drifting Zipf 1.0"
    )
    head = f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}"
    print(f"{'policy':>15} | {head} | stall s | re-plans | slots moved")
    for name, s in sim["policies"].items():
        cells = f"{s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['max_ms']:>8.2f} {s['mean_ms']:>8.2f}"
        print(
            f"{name:>15} | {cells} | {s['stall_s']:>7.3f} | {s['replans']:>8} | "
            f"{s['slots_moved']:>11}"
        )


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    cases = []
    for experts, shards, nodes in SIZES:
        for exponent in EXPONENTS:
            for extra in EXTRAS:
                cases.append(run_case(experts, shards, nodes, exponent, extra, args))
                c = cases[-1]
                say(
                    f"case {experts}/{shards} zipf {exponent} extra {extra}: ratio "
                    f"{c['balancedness']['ratio']}, moved {c['replan']['ours_moved_share']}"
                )
    timing = planning_time(args)
    cal = calibrate()
    say(f"calibration: c0 {cal['c0_s'] * 1000:.3f} ms, c1 {cal['c1_s'] * 1e6:.2f} us/token")
    sim = simulate(args, cal)
    print_cases(cases)
    t = timing["median_ms"]
    print(
        f"Planning time, 58 x 256 x 288, median of {args.rounds}: EPLB {t['eplb']:.1f} ms, "
        f"ours re-plan {t['ours_replan']:.1f} ms ({timing['ours_replan_vs_eplb']:.3f}x), "
        f"ours from scratch {t['ours_from_scratch']:.1f} ms "
        f"({timing['ours_from_scratch_vs_eplb']:.3f}x)"
    )
    print_sim(sim)
    zipf1 = next(c for c in cases if (c["experts"], c["zipf"], c["extra"]) == (64, 1.0, 0.25))
    pol = sim["policies"]
    targets = {
        "balancedness_vs_eplb_worst": target(
            max(c["balancedness"]["ratio"] for c in cases),
            GOALS["balancedness_vs_eplb_worst"],
            False,
        ),
        "balancedness_zipf1_25pct": target(
            zipf1["balancedness"]["ours"], GOALS["balancedness_zipf1_25pct"], False
        ),
        "moved_slots_share_5pct_drift": target(
            max(c["replan"]["ours_moved_share"] for c in cases),
            GOALS["moved_slots_share_5pct_drift"],
            False,
        ),
        "planning_time_vs_eplb": target(
            timing["ours_replan_vs_eplb"], GOALS["planning_time_vs_eplb"], False
        ),
        "sim_p99_vs_no_replication": target(
            pol["ours"]["p99_ms"] / pol["no_replication"]["p99_ms"],
            GOALS["sim_p99_vs_no_replication"],
            False,
        ),
        "sim_p99_vs_interval": target(
            pol["ours"]["p99_ms"] / pol["interval"]["p99_ms"], 1.0, False
        ),
    }
    ratio = targets["sim_p99_vs_interval"]["value"]
    targets["sim_p99_vs_interval"]["direction"] = "<"
    targets["sim_p99_vs_interval"]["met"] = ratio is not None and ratio < 1.0
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "definitions": {
            "balancedness": "max shard load / mean shard load per layer (an expert's load split "
            "evenly over its replicas), mean over layers",
            "drift": f"each expert's load x exp({DRIFT} z), z ~ N(0, 1), renormalised",
            "moved": "slots a shard must load that it did not hold, summed, over all slots "
            "(layers x shards x slots)",
            "window_tokens": WINDOW_TOKENS,
        },
        "cases": cases,
        "summary": {
            "moved_share_median": round(
                median([c["replan"]["ours_moved_share"] for c in cases]), 4
            ),
            "cases_over_moved_goal": [
                f"{c['experts']}/{c['shards']} zipf {c['zipf']} extra {c['extra']}: "
                f"{c['replan']['ours_moved_share']}"
                for c in cases
                if c["replan"]["ours_moved_share"] > GOALS["moved_slots_share_5pct_drift"]
            ],
            "eplb_moved_share_median": round(
                median([c["replan"]["eplb_moved_share"] for c in cases]), 4
            ),
        },
        "planning_time": timing,
        "simulation": sim,
    }
    write_results(args, report, targets, started=started)


if __name__ == "__main__":
    main()
