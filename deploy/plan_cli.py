"""``moe-cluster plan``: an expert placement from a load file, printed as JSON or a table.

For an operator sizing a deployment or checking what a re-plan would move: it reads
``{"load": [[tokens per expert] per MoE layer]}``, optionally the current placement in
the same shape the command prints, and calls ``router.placement`` (pure, no Ray, no
torch). This module only parses flags, reads files (bounded) and renders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from router.placement import PlacementPlan, choose_redundancy, plan_placement

MAX_FILE_BYTES = 64 << 20  # a load or plan file larger than this is refused


def add_plan_parser(sub: Any) -> None:
    """Register ``plan`` on the CLI's subparsers (``sub`` is argparse's action)."""
    plan = sub.add_parser(
        "plan",
        help="place experts on shards from a load matrix",
        description="Replicate hot experts and pack expert slots onto shards so that no "
        "shard straggles, from per-(layer, expert) token counts. With --current, keep as "
        "many current slots as possible (a plan within 1% of the best found wins) and "
        "report the slots that would move.",
    )
    plan.add_argument("--load", type=Path, required=True, help='JSON: {"load": [[...], ...]}')
    plan.add_argument("--shards", type=int, required=True, help="expert shards (G)")
    plan.add_argument(
        "--slots-per-shard", type=int, required=True, help="expert slots per shard and layer (S)"
    )
    plan.add_argument("--nodes", type=int, default=1, help="nodes, shards split evenly (1)")
    plan.add_argument("--current", type=Path, default=None, help="current plan, as --json prints")
    plan.add_argument("--max-moves", type=int, default=None, help="move at most this many slots")
    plan.add_argument("--bytes-per-slot", type=int, default=None, help="report moved bytes")
    plan.add_argument(
        "--target-balancedness",
        type=float,
        default=None,
        help="use the fewest slots per shard (up to --slots-per-shard) that reach this",
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_plan(args: argparse.Namespace) -> int:
    load = _read_json(args.load, "load")
    if not isinstance(load, dict) or "load" not in load:
        raise ValueError(f'{args.load}: expected an object {{"load": [[...], ...]}}')
    if args.target_balancedness is not None:
        if args.current is not None or args.max_moves is not None:
            raise ValueError("--target-balancedness plans from scratch: drop --current/--max-moves")
        plan = choose_redundancy(
            load["load"],
            args.shards,
            target_balancedness=args.target_balancedness,
            max_slots_per_shard=args.slots_per_shard,
            num_nodes=args.nodes,
        )
    else:
        current = None if args.current is None else _plan_layers(args.current)
        plan = plan_placement(
            load["load"],
            args.shards,
            args.slots_per_shard,
            num_nodes=args.nodes,
            current=current,
            max_moved_slots=args.max_moves,
            bytes_per_slot=args.bytes_per_slot,
        )
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(render_table(plan))
    return 0


def render_table(plan: PlacementPlan) -> str:
    """One line per (layer, shard): its experts, replicated ones marked with ``*``."""
    lines = [
        f"{plan.num_layers} layers, {plan.num_experts} experts on {plan.num_shards} shards x "
        f"{plan.slots_per_shard} slots ({plan.extra_slots} extra per layer), "
        f"{plan.num_nodes} node(s)",
        f"balancedness {plan.balancedness:.4f} (max / mean shard load, mean over layers); "
        f"slots moved {plan.moved_slots}"
        + ("" if plan.moved_bytes is None else f" ({plan.moved_bytes} bytes)"),
        f"{'layer':>5} {'shard':>5}  experts",
    ]
    for index, (shards, balance) in enumerate(
        zip(plan.layers, plan.balancedness_per_layer, strict=True)
    ):
        counts: dict[int, int] = {}
        for held in shards:
            for e in held:
                counts[e] = counts.get(e, 0) + 1
        for g, held in enumerate(shards):
            cells = " ".join(f"{e}{'*' if counts[e] > 1 else ''}" for e in held)
            lines.append(f"{index:>5} {g:>5}  {cells}")
        lines.append(f"{index:>5} {'':>5}  balancedness {balance:.4f}")
    return "\n".join(lines)


def _plan_layers(path: Path) -> list[Any]:
    data = _read_json(path, "current plan")
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise ValueError(f'{path}: expected {{"layers": [{{"shards": [[...], ...]}}, ...]}}')
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("shards"), list):
            raise ValueError(f'{path}: layers[{i}] must be an object with a "shards" list')
        out.append(layer["shards"])
    return out


def _read_json(path: Path, what: str) -> Any:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{what} file {path} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not JSON: {err.msg} at line {err.lineno}") from err
    except RecursionError as err:
        raise ValueError(f"{what} file {path} nests too deeply") from err
