"""One MoE layer's routed-expert compute: the per-expert Python loop vs grouped alternatives.

All alternatives compute the same weighted sum over each token's K experts of one layer,
at the ``bench`` demo preset's expert shapes (hidden 512, intermediate 1024, 16 experts,
top-2; random weights):

- ``loop``: the per-expert loop as it was (``experts.ffn.run_routed_experts`` over one
  [2I, H] / [H, I] tensor pair per expert, the checkpoint's layout);
- ``grouped_mm_in_out``: pairs sorted by slot, one ``torch._grouped_mm`` per projection
  over the experts stacked in slots (``experts.grouped_ffn.routed_expert_sum``), stored
  [in, out] (gate_up [S, H, 2I], down [S, I, H] contiguous);
- ``grouped_mm_out_in``: the same on stacks in the checkpoint's [out, in] layout
  ([S, 2I, H], [S, H, I]) read through a transposed view (the storage layout choice,
  ``experts.expert_slots.stores_in_out``);
- ``sorted_slices``: the same sorted pairs, one ``mm`` per non-empty slot over contiguous
  slices (the kernel's fallback where grouped_mm does not run), on ``ExpertSlots``' layout;
- ``gathered_bmm``: each pair's expert weights gathered (``gate_up[slot_ids]``), one ``bmm``
  per projection (transformers' ``batched_mm``), only for decode-sized batches
  (at most ``--bmm-max-pairs`` pairs: it copies a whole expert per pair);
- ``packed``: the same sorted pairs, one oneDNN ``linear`` per non-empty slot over weights
  prepacked per slot (``ExpertSlots`` layout ``packed``, ``experts.grouped_ffn.
  packed_expert_sum``), where oneDNN prepacks the dtype on this CPU.

Timing: one round times every alternative at every batch size (tokens), each as the mean
of enough calls to last ~``--call-s``, the alternatives' calls alternating one by one (in an
order rotated every round) so that bursts of other work hit them alike; ratios are
loop time / alternative time in the same round (above 1: faster than the loop), and the
figures are medians over ``--rounds`` rounds, with the spread of the rounds as the noise
(before each round, up to 5 s of waiting for a quiet machine).
The winner per batch size is the alternative with the best median ratio. No target: the
point is the choice, which ``experts.expert_slots.choose_layout`` (packed where oneDNN
prepacks, else stacked) and ``experts.grouped_ffn`` (the stacked kernel per regime) apply. Writes
``bench/results/expert_kernels.json``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.harness import median, parser, percentile, quick_or, say, wait_for_quiet, write_results
from experts.expert_slots import ExpertSlots, choose_layout, packing_supported, stores_in_out
from experts.ffn import run_routed_experts
from experts.grouped_ffn import grouped_mm_supported, routed_expert_sum, use_grouped_mm_for
from experts.weights import MLPWeights

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, ids, w) -> out
QUIET_WAIT_S = 5.0
ALTERNATIVES = (
    "loop",
    "grouped_mm_in_out",
    "grouped_mm_out_in",
    "sorted_slices",
    "gathered_bmm",
    "packed",
)


def gathered_bmm(
    hidden: torch.Tensor,  # [T, H]
    slot_ids: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K]
    gate_up: torch.Tensor,  # [S, H, 2I]
    down: torch.Tensor,  # [S, I, H]
) -> torch.Tensor:  # [T, H]
    num_tokens, num_k = slot_ids.shape
    flat = slot_ids.reshape(-1)  # [P]
    x = hidden.repeat_interleave(num_k, dim=0)  # [P, H]
    h = torch.bmm(x[:, None, :], gate_up[flat]).squeeze(1)  # [P, 2I]
    gate, up = h.chunk(2, dim=-1)  # [P, I] each
    y = torch.bmm((F.silu(gate) * up)[:, None, :], down[flat]).squeeze(1)  # [P, H]
    y = y * weights.reshape(-1)[:, None]  # [P, H]
    return y.view(num_tokens, num_k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]


def kernels(
    slots: ExpertSlots, packed: ExpertSlots | None, mlps: list[MLPWeights]
) -> dict[str, Kernel]:
    """Slot s holds expert s in ``slots`` (stacked) and ``packed``; ``mlps`` are the same
    experts in the checkpoint's layout."""
    gu, dn = slots.gate_up, slots.down  # [S, H, 2I], [S, I, H] in the slots' own layout
    out_in_gu = torch.stack([m.gate_up for m in mlps]).transpose(1, 2)  # [S, H, 2I] view
    out_in_dn = torch.stack([m.down for m in mlps]).transpose(1, 2)  # [S, I, H] view
    in_out_gu, in_out_dn = out_in_gu.contiguous(), out_in_dn.contiguous()  # [S, H, 2I], [S, I, H]
    return {
        "loop": lambda x, ids, w: run_routed_experts(x, ids, w, lambda e: mlps[e]),
        "grouped_mm_in_out": lambda x, ids, w: routed_expert_sum(
            x, ids, w, in_out_gu, in_out_dn, use_grouped_mm=True
        ),
        "grouped_mm_out_in": lambda x, ids, w: routed_expert_sum(
            x, ids, w, out_in_gu, out_in_dn, use_grouped_mm=True
        ),
        "sorted_slices": lambda x, ids, w: routed_expert_sum(
            x, ids, w, gu, dn, use_grouped_mm=False
        ),
        "gathered_bmm": lambda x, ids, w: gathered_bmm(x, ids, w, gu, dn),
        **(
            {"packed": lambda x, ids, w: packed.expert_sum(x, ids, w)} if packed is not None else {}
        ),
    }


def inputs(
    tokens: int, args: Any, gen: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [T, H], [T, K], [T, K]
    hidden = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, args.experts, generator=gen)  # [T, E]
    weights, ids = torch.softmax(logits, dim=-1).topk(args.top_k, dim=-1)  # [T, K] each
    return hidden, ids, weights / weights.sum(dim=-1, keepdim=True)


def chosen_kernel(num_pairs: int, args: Any, dtype: torch.dtype) -> str:
    """What ``ExpertSlots`` runs for this many pairs, in the layout it picks here."""
    cpu = torch.device("cpu")
    if choose_layout(cpu, dtype) == "packed":
        return "packed"
    in_out = stores_in_out(cpu, dtype)
    shape = (num_pairs, args.experts, args.hidden, args.inter, in_out)
    if not use_grouped_mm_for(cpu, dtype, *shape):
        return "sorted_slices"
    return "grouped_mm_in_out" if stores_in_out(cpu, dtype) else "grouped_mm_out_in"


def calls_for(fn: Callable[[], Any], call_s: float) -> int:
    """Back-to-back calls that last about ``call_s`` (from a warm-up call)."""
    start = time.perf_counter()
    fn()
    return max(1, min(200, math.ceil(call_s / max(time.perf_counter() - start, 1e-6))))


def main() -> None:
    p = parser("expert_kernels", __doc__)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="tokens per layer call")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--call-s", type=float, default=None, help="seconds per timed measurement")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bmm-max-pairs", type=int, default=128)
    args = p.parse_args()
    started = time.perf_counter()
    if args.quiet_wait is None and not args.quick:  # per round: keeps a busy machine's run short
        args.quiet_wait = QUIET_WAIT_S
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = quick_or(args, args.batches, [1, 16, 64], [1, 16, 64, 512])
    rounds = quick_or(args, args.rounds, 3, 15)
    call_s = quick_or(args, args.call_s, 0.02, 0.08)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    shape = (args.experts, args.experts, args.hidden, args.inter, dtype, "cpu")
    slots = ExpertSlots(*shape, layout="stacked")
    can_pack = packing_supported(torch.device("cpu"), dtype)
    packed = ExpertSlots(*shape, layout="packed") if can_pack else None
    mlps = []
    for e in range(args.experts):
        gate_up = torch.randn(2 * args.inter, args.hidden, generator=gen) * args.hidden**-0.5
        down = torch.randn(args.hidden, args.inter, generator=gen) * args.inter**-0.5
        mlps.append(MLPWeights(gate_up.to(dtype), down.to(dtype)))  # [2I, H], [H, I]
        slots.add(e, mlps[-1])
        if packed is not None:
            packed.add(e, mlps[-1])
    fns = kernels(slots, packed, mlps)
    cases: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    wanted: dict[int, list[str]] = {}
    calls: dict[tuple[int, str], int] = {}
    max_error: dict[str, dict[str, float]] = {}
    torch.set_grad_enabled(False)
    for tokens in batches:
        x, ids, w = cases[tokens] = inputs(tokens, args, gen, dtype)
        slot_ids = slots.lookup(ids)
        wanted[tokens] = [
            a
            for a in ALTERNATIVES
            if (a != "gathered_bmm" or tokens * args.top_k <= args.bmm_max_pairs) and a in fns
        ]
        reference = fns["loop"](x, slot_ids, w).float()
        max_error[str(tokens)] = {}
        cases[tokens] = (x, slot_ids, w)
        for alt in wanted[tokens]:
            calls[tokens, alt] = calls_for(functools.partial(fns[alt], *cases[tokens]), call_s)
            err = (fns[alt](x, slot_ids, w).float() - reference).abs().max().item()
            max_error[str(tokens)][alt] = err

    times: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
    quiet: list[dict[str, float]] = []
    for r in range(rounds):
        quiet.append(wait_for_quiet(args))
        for tokens in batches:
            x, slot_ids, w = cases[tokens]
            alts = wanted[tokens]
            alts = alts[r % len(alts) :] + alts[: r % len(alts)]  # rotate who goes first
            spent = dict.fromkeys(alts, 0.0)
            # call by call, alternating, so that a burst of other work hits every alternative
            for i in range(max(calls[tokens, a] for a in alts)):
                for alt in alts:
                    if i < calls[tokens, alt]:
                        start = time.perf_counter()
                        fns[alt](x, slot_ids, w)
                        spent[alt] += time.perf_counter() - start
            for alt in alts:
                times[tokens, alt].append(spent[alt] / calls[tokens, alt])
        say(f"round {r + 1}/{rounds} done")

    rows: dict[str, Any] = {}
    print(
        f"{'tokens':>6} {'alternative':>18} {'median ms':>10} {'x loop':>7} {'rounds x loop':>16}"
    )
    for tokens in batches:
        row: dict[str, Any] = {}
        for alt in wanted[tokens]:
            ratios = [a / b for a, b in zip(times[tokens, "loop"], times[tokens, alt], strict=True)]
            row[alt] = {
                "median_ms": round(median(times[tokens, alt]) * 1e3, 4),
                "ratio_vs_loop": round(median(ratios), 3),
                "ratio_p10_p90": [
                    round(percentile(ratios, 10), 3),
                    round(percentile(ratios, 90), 3),
                ],
                "round_ms": [round(t * 1e3, 4) for t in times[tokens, alt]],
                "calls_per_round": calls[tokens, alt],
                "max_abs_error_vs_loop": max_error[str(tokens)][alt],
            }
            spread = row[alt]["ratio_p10_p90"]
            print(
                f"{tokens:>6} {alt:>18} {row[alt]['median_ms']:>10.3f} "
                f"{row[alt]['ratio_vs_loop']:>7.2f} {spread[0]:>7.2f}-{spread[1]:<7.2f}"
            )
        winner = max(wanted[tokens], key=lambda a: row[a]["ratio_vs_loop"])
        chosen = chosen_kernel(tokens * args.top_k, args, dtype)
        rows[str(tokens)] = {"winner": winner, "kernel_in_use": chosen, "alternatives": row}
        print(f"{tokens:>6} winner: {winner}; the kernel uses {chosen}")
    report = {
        "shapes": {
            "hidden": args.hidden,
            "intermediate": args.inter,
            "experts": args.experts,
            "top_k": args.top_k,
            "dtype": args.dtype,
        },
        "slot_layout": choose_layout("cpu", dtype),
        "stacked_storage": "in_out" if stores_in_out(torch.device("cpu"), dtype) else "out_in",
        "grouped_mm_runs_here": grouped_mm_supported(
            torch.device("cpu"), dtype, args.hidden, args.inter
        ),
        "choice": "experts.expert_slots.choose_layout: packed slots wherever oneDNN prepacks "
        "the dtype (CPU), else stacked slots with experts.grouped_ffn.use_grouped_mm_for: "
        "grouped_mm wherever it runs, except sorted slices on CPU for at most one pair per 8 "
        "slots; a winner within the rounds' spread of the kernel in use is a tie; the stacked "
        "storage per device and dtype: experts.expert_slots.stores_in_out",
        "rounds": rounds,
        "ratio": "loop seconds / alternative seconds in the same round (above 1: faster)",
        "by_tokens": rows,
        "quiet": quiet,
    }
    variant = "" if args.dtype == "float32" else f".{args.dtype}"
    write_results(args, report, {}, variant=variant, started=started)


if __name__ == "__main__":
    main()
