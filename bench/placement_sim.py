"""The placement simulation of ``bench/placement.py`` (part 3 of its docstring): 64 GPUs,
256 experts in 5 slots each, drifting Zipf popularity; no replication, interval re-planning
(vLLM's default, EPLB from scratch, serving stalled while slots copy) and ours (re-plan from
the current plan when balancedness drifts, slots copied in the background).

A shard's time for a layer is ``c0 + c1 * tokens``, calibrated here (``calibrate``) from one
expert FFN of the ``bench`` demo preset and the no-op dispatch round trip in
``bench/results/dispatch.json``.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.eplb_reference import rebalance_experts
from bench.harness import RESULTS, percentile
from router.placement import PlacementPlan, plan_placement

SIM_GPUS, SIM_EXPERTS, SIM_SLOTS, SIM_NODES, SIM_LAYERS = 64, 256, 5, 8, 4
SIM_TOKENS = 64 * 16 * 8  # routed per layer and step: 16 tokens per GPU, top-8
SIM_TICK = 100  # steps per popularity update and per check of ours
SIM_DRIFT = 0.05  # std of the log-weight step per tick
SIM_REVERT = 0.01  # pull of the log-weights back to their Zipf start per tick
EXPERT_SHAPE = (512, 1024)  # hidden, intermediate of the measured expert
COPY_BYTES_PER_S = 26e9  # MEASURED.md: memory read bandwidth, one torch thread


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
