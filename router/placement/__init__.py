"""Routing-aware expert placement: replicate hot experts, pack slots so no shard straggles.

Pure and torch-free: loads are floats, experts and shards are ints (shape legend in
``geometry``). Method, per layer (every layer has its own load, so its own placement):

1. **Replicate** (``bounds.greedy_counts``). Every expert gets one slot; each extra slot
   goes to the expert whose load per replica is highest now, which minimises the largest
   load per replica, the floor under the straggler shard.
2. **Pack** (``layer.Layer.pack``). Replicas, heaviest first, go to the lightest shard with
   a free slot that does not hold that expert, preferring a node without it on a tie.
3. **Improve** (``improve``). While the heaviest shard is above a lower bound, move or swap
   one of its replicas, or re-purpose a cold expert's spare replica, when that leaves every
   shard touched below the old maximum; replicas then spread over ``NODE_SPREAD`` nodes, so a
   node loss never removes an expert, and the improvement runs again under that rule.
4. **Re-plan from a current plan** (``replan``). The target is ``tolerance`` (1%) above a
   lower bound on any plan's maximum (``arrays``, every layer at once in numpy). Keep a
   layer under it; else swap replicas between its heavy and light shards, all layers
   together (``batch``). Only a layer that fails pays for the slow path: the best plan
   from scratch, a repair of the current plan (``repair``, ``improve``) and a re-pairing
   by minimum-cost assignment rounds (``reassign``), each pulled back towards the current
   plan; the one moving fewest slots among those within 1% of the best found wins.

Balancedness of a layer is max shard load / mean shard load (1.0 is perfect; an expert's
load splits evenly among its replicas); a plan's balancedness is the mean over layers.
A slot moved is a (shard, expert) the shard did not hold in the current plan.
"""

from router.placement.bounds import (
    greedy_bound,
    greedy_counts,
    layer_balancedness,
    lower_bound,
    moved_slots,
    shard_loads,
)
from router.placement.geometry import (
    DEFAULT_TOLERANCE,
    NODE_SPREAD,
    PACK_NODE_SLACK,
    Geometry,
    Shards,
    ShardsIn,
)
from router.placement.plan import PlacementPlan, choose_redundancy, plan_placement
from router.placement.validate import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_LOAD,
    MAX_SHARDS,
    MAX_SLOTS_PER_LAYER,
    MAX_SLOTS_PER_SHARD,
    MAX_TOTAL_SLOTS,
    validate_current,
    validate_load,
)

_Geometry = Geometry  # the name this module had before it became a package

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "MAX_LOAD",
    "MAX_SHARDS",
    "MAX_SLOTS_PER_LAYER",
    "MAX_SLOTS_PER_SHARD",
    "MAX_TOTAL_SLOTS",
    "NODE_SPREAD",
    "PACK_NODE_SLACK",
    "Geometry",
    "PlacementPlan",
    "Shards",
    "ShardsIn",
    "choose_redundancy",
    "greedy_bound",
    "greedy_counts",
    "layer_balancedness",
    "lower_bound",
    "moved_slots",
    "plan_placement",
    "shard_loads",
    "validate_current",
    "validate_load",
]
