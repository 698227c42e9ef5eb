"""When to re-place a tier's experts: imbalance that a plan would cut by more than it costs,
or drift of the load, with hysteresis so that a load hovering at a threshold never flaps.

Two steps, so that planning (cheap, but not free) runs only when a re-plan could happen:

1. ``consider``: is it worth planning? Not before ``min_tokens`` routed tokens, nor within
   ``min_interval_s`` of the last attempt. Then on drift (the load's shares moved more than
   ``drift_threshold`` since the last plan), or on imbalance (balancedness of the current
   placement under the recent load above ``imbalance_threshold``) while armed. An applied
   plan disarms the imbalance trigger until balancedness falls below ``imbalance_threshold -
   margin`` (a Schmitt trigger): a load oscillating around the threshold re-plans once.
2. ``accept``: apply the plan found? Only when its gain (current minus planned
   balancedness) beats its move cost by ``margin``. The cost is the time to copy the moved
   bytes at ``copy_bandwidth_bytes_per_s``, amortised over ``amortize_horizon_s`` of serving
   (the share of that horizon the copy takes), in the same units as balancedness.

Balancedness here is step-time faithful: a step waits for the slowest shard of every layer,
so it is the sum over layers of the max shard load over the sum of the mean shard loads
(1.0: perfect), each expert's load split evenly among its replicas.

Pure: ids, ints and floats, an injected clock (``now``), no tensors, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from router.routing_table import RoutingTable


@dataclass(frozen=True)
class ReplanConfig:
    """A tier's re-placement settings (``experts.replan`` in the cluster config)."""

    enabled: bool = False
    report_interval_s: float = 5.0  # a replica sends its routed counts this often (or sooner)
    window_s: float = 10.0  # reports within this long are one window of the load
    num_windows: int = 6  # windows kept: the recent load is the last num_windows * window_s
    ema_alpha: float = 0.3  # weight of each closed window in the exponential average
    min_tokens: int = 4096  # routed (token, k) pairs in the window before any plan
    imbalance_threshold: float = 1.25  # re-plan when balancedness is above this ...
    margin: float = 0.05  # ... and the gain beats the cost by this; re-armed below thr - margin
    drift_threshold: float = 0.2  # or when the load's shares moved this much (0..1)
    min_interval_s: float = 60.0  # between two planning attempts of a tier
    copy_bandwidth_bytes_per_s: float = 1e9  # how fast shards load expert weights
    amortize_horizon_s: float = 600.0  # serving time over which a move's copy is amortised
    extra_slots: float = 0.25  # redundant slots per shard, as a fraction of its experts
    max_moved_slots: int | None = None  # move budget per re-plan; None: the planner's choice
    layers_per_step: int = 0  # layers moved at once (memory held twice); 0: all
    ack_timeout_s: float = 120.0  # how long a move waits for every engine to swap tables
    replica_ttl_s: float = 60.0  # a replica silent this long no longer holds a move back

    def __post_init__(self) -> None:
        positive = {
            "report_interval_s": self.report_interval_s,
            "window_s": self.window_s,
            "ema_alpha": self.ema_alpha,
            "copy_bandwidth_bytes_per_s": self.copy_bandwidth_bytes_per_s,
            "amortize_horizon_s": self.amortize_horizon_s,
            "ack_timeout_s": self.ack_timeout_s,
            "replica_ttl_s": self.replica_ttl_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if self.ema_alpha > 1:
            raise ValueError(f"ema_alpha={self.ema_alpha!r} must be <= 1")
        if not 1 <= self.num_windows <= 1000:
            raise ValueError(f"num_windows={self.num_windows!r} must be in 1..1000")
        for name, value in (
            ("min_tokens", self.min_tokens),
            ("layers_per_step", self.layers_per_step),
        ):
            if value < 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        if self.imbalance_threshold < 1:
            raise ValueError(
                f"imbalance_threshold={self.imbalance_threshold!r} must be >= 1 "
                "(balancedness is max over mean shard load)"
            )
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin={self.margin!r} must be in [0, 1)")
        if not 0 < self.drift_threshold <= 1:
            raise ValueError(f"drift_threshold={self.drift_threshold!r} must be in (0, 1]")
        if self.min_interval_s < 0:
            raise ValueError(f"min_interval_s={self.min_interval_s!r} must be >= 0")
        if not 0 <= self.extra_slots <= 4:
            raise ValueError(f"extra_slots={self.extra_slots!r} must be in [0, 4]")
        if self.max_moved_slots is not None and self.max_moved_slots < 0:
            raise ValueError(f"max_moved_slots={self.max_moved_slots!r} must be >= 0 or null")
        if self.ack_timeout_s < self.report_interval_s:
            raise ValueError(
                f"ack_timeout_s={self.ack_timeout_s!r} must be >= report_interval_s "
                f"({self.report_interval_s}): engines learn of a table when they report"
            )


def layer_shard_loads(
    load_row: Sequence[float], layer: int, table: RoutingTable, shard_ids: Sequence[str]
) -> list[float]:
    """[S] each shard's share of one layer's load, an expert's load split among its replicas."""
    index = {sid: i for i, sid in enumerate(shard_ids)}
    loads = [0.0] * len(shard_ids)
    for expert, tokens in enumerate(load_row):
        replicas = table.shards_for(layer, expert)
        for sid in replicas:
            loads[index[sid]] += tokens / len(replicas)
    return loads


def balancedness(
    load: Sequence[Sequence[float]],
    moe_layers: Sequence[int],
    table: RoutingTable,
    shard_ids: Sequence[str] | None = None,
) -> float:
    """Sum over layers of the max shard load over the sum of mean shard loads (1.0 when no
    load): the factor by which the slowest shard stretches a step. ``shard_ids``: every shard
    of the tier (default: those the table uses; an empty shard counts in the mean)."""
    shards = list(shard_ids) if shard_ids is not None else list(table.shards)
    total_max = total_mean = 0.0
    for layer, row in zip(moe_layers, load, strict=True):
        loads = layer_shard_loads(row, layer, table, shards)
        total_max += max(loads, default=0.0)
        total_mean += sum(loads) / max(len(loads), 1)
    return total_max / total_mean if total_mean > 0 else 1.0


@dataclass(frozen=True)
class Trigger:
    """Why a plan is worth computing: ``reason`` is ``imbalance`` or ``drift``."""

    reason: str
    imbalance: float
    drift: float


@dataclass(frozen=True)
class Verdict:
    """Whether to apply a plan, with the figures it was judged on (for logs and metrics)."""

    apply: bool
    reason: str  # applied | gain_below_cost
    gain: float  # current minus planned balancedness
    cost: float  # copy seconds over the horizon


@dataclass
class ReplanPolicy:
    """One tier's re-plan decisions (see the module docstring); state: the last attempt's
    time and whether the imbalance trigger is armed."""

    config: ReplanConfig
    last_attempt_at: float | None = None
    armed: bool = True
    num_attempts: int = 0
    num_applied: int = 0
    history: list[str] = field(default_factory=list)  # the last few decisions, for debugging

    def consider(
        self, now: float, imbalance: float, drift: float, num_tokens: int
    ) -> Trigger | None:
        """A ``Trigger`` when a plan should be computed now; ``None`` otherwise."""
        cfg = self.config
        if imbalance < cfg.imbalance_threshold - cfg.margin:
            self.armed = True  # the placement fits the load again: the next crossing counts
        if num_tokens < cfg.min_tokens:
            return None
        if self.last_attempt_at is not None and now - self.last_attempt_at < cfg.min_interval_s:
            return None
        if drift >= cfg.drift_threshold:
            reason = "drift"
        elif imbalance > cfg.imbalance_threshold and self.armed:
            reason = "imbalance"
        else:
            return None
        self.last_attempt_at = now
        self.num_attempts += 1
        return Trigger(reason, imbalance, drift)

    def accept(self, current: float, planned: float, moved_bytes: int) -> Verdict:
        """Apply a plan of balancedness ``planned`` (now ``current``) moving ``moved_bytes``?"""
        cfg = self.config
        gain = current - planned
        cost = moved_bytes / cfg.copy_bandwidth_bytes_per_s / cfg.amortize_horizon_s
        if gain - cost > cfg.margin:
            self.num_applied += 1
            self.armed = False
            verdict = Verdict(True, "applied", gain, cost)
        else:
            verdict = Verdict(False, "gain_below_cost", gain, cost)
        self.history = [*self.history[-15:], f"{verdict.reason} gain={gain:.3f} cost={cost:.3f}"]
        return verdict
