"""The faults of ``bench.reliability``: which actor (or node) each scenario takes out, how, and
how the bench sees its replacement.

Actors are found by what the code names them: Serve replicas ``SERVE_REPLICA::<app>#<deployment>
#<id>`` (the backbones ``tier-<tier>``, the gateway ``gateway``), store shards ``kv-store-<node
id[:16]>``, the placement controller ``moe-placement-controller``. Expert shards are unnamed
actors of class ``ShardActor`` owned by the tier's pool replica (``experts-<tier>``): the pool's
``describe`` hands out their handles by shard id, whose actor ids the GCS lists with their
processes. Every kill is a SIGKILL of the actor's process (``cluster.faults``), a node removal
is ``Cluster.remove_node`` (its raylet and every worker on it go).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.reliability_outcomes import replicated_share
from cluster.faults import (
    ActorProcess,
    actors_named,
    actors_of_class,
    kill_actor_process,
    live_actors,
    wait_for_replacement,
    wait_until,
)


@dataclass
class Context:
    """What the faults need of the running bench: the app's name, the Ray test cluster and its
    worker nodes by label, and the tier names."""

    app: str
    cluster: Any
    workers: dict[str, Any]  # label -> ray.cluster_utils node
    replicated_tier: str
    plain_tier: str


@dataclass
class Target:
    """What a fault takes out, and facts about it for the row (``facts``)."""

    describe: str
    actor: ActorProcess | None = None
    node: Any = None
    before_pids: frozenset[int] = frozenset()
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One fault: ``tier`` takes the traffic; ``prepare`` picks the target (or says why not);
    ``replaced`` waits for the replacement (seconds; None when there is none to wait for)."""

    name: str
    tier: str
    prepare: Callable[[Context], Target | str]
    replaced: Callable[[Context, Target, float], float | None]


def inject(ctx: Context, target: Target) -> None:
    """SIGKILL the target's process, or remove its node."""
    if target.actor is not None:
        kill_actor_process(target.actor)
    else:
        ctx.cluster.remove_node(target.node, allow_graceful=False)


def _replica_prefix(ctx: Context, deployment: str) -> str:
    return f"SERVE_REPLICA::{ctx.app}#{deployment}#"


def _first(actors: list[ActorProcess], what: str) -> Target | str:
    return (
        Target(f"{what} {actors[0].name or actors[0].actor_id}", actors[0])
        if actors
        else (f"no live {what} found")
    )


def _timed(condition: Callable[[], bool], timeout_s: float, what: str) -> float | None:
    try:
        return round(wait_until(condition, timeout_s, what, poll_s=0.25), 2)
    except TimeoutError:
        return None


# ----------------------------------------------------------------------------- kv store shard


def _store_shard(ctx: Context) -> Target | str:
    from cluster.kv_store.shard_actor import SHARD_NAME_PREFIX

    node_a = ctx.workers["a"].node_id
    return _first(
        [a for a in actors_named(SHARD_NAME_PREFIX) if a.node_id == node_a], "store shard"
    )


def _same_name_back(ctx: Context, target: Target, timeout_s: float) -> float | None:
    assert target.actor is not None
    try:
        return round(wait_for_replacement(target.actor, target.actor.name, timeout_s), 2)
    except TimeoutError:
        return None


# ----------------------------------------------------------------------------- Serve replicas


def _backbone(ctx: Context) -> Target | str:
    replicas = actors_named(_replica_prefix(ctx, f"tier-{ctx.replicated_tier}"))
    target = _first(replicas, "backbone replica")
    if isinstance(target, Target):
        target.facts["replicas_before"] = len(replicas)
    return target


def _replica_back(ctx: Context, target: Target, timeout_s: float) -> float | None:
    """A Serve replica is replaced under a new name: back once as many live replicas of the
    deployment as before run and the killed one is not among them."""
    assert target.actor is not None
    prefix = target.actor.name.rsplit("#", 1)[0] + "#"
    count = target.facts.get("replicas_before", 1)

    def back() -> bool:
        live = actors_named(prefix)
        return len(live) >= count and all(a.pid != target.actor.pid for a in live)  # type: ignore[union-attr]

    return _timed(back, timeout_s, "a replacement replica")


def _gateway(ctx: Context) -> Target | str:
    return _first(actors_named(_replica_prefix(ctx, "gateway")), "gateway replica")


# ----------------------------------------------------------------------------- controller


def _controller(ctx: Context) -> Target | str:
    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    return _first(actors_named(CONTROLLER_NAME), "placement controller")


def _controller_back(ctx: Context, target: Target, timeout_s: float) -> float | None:
    """Back once restarted (a new process) and holding the tier's table again."""
    import ray

    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    def knows_tier() -> bool:
        if not any(a.pid != target.actor.pid for a in actors_named(CONTROLLER_NAME)):  # type: ignore[union-attr]
            return False
        try:
            controller = ray.get_actor(CONTROLLER_NAME)
            return ray.get(controller.table.remote(ctx.replicated_tier), timeout=5) is not None
        except (ValueError, ray.exceptions.RayError):
            return False

    return _timed(knows_tier, timeout_s, "the controller holding the tier's table")


# ----------------------------------------------------------------------------- expert shards


def shard_handles(ctx: Context, tier: str) -> dict[str, Any]:
    """The tier's expert shard actor handles, by shard id (from its pool replica)."""
    from ray import serve

    pool: Any = serve.get_deployment_handle(f"experts-{tier}", app_name=ctx.app)
    handles, _table = pool.describe.remote().result(timeout_s=30)
    return dict(handles)


def controller_table(tier: str) -> Any:
    """The controller's (version, placement) of ``tier``, None when it holds none."""
    import ray

    from cluster.expert_parallel.placement_host import CONTROLLER_NAME

    return ray.get(ray.get_actor(CONTROLLER_NAME).table.remote(tier), timeout=10)


def _shard_target(ctx: Context, tier: str, shard_id: str, facts: dict[str, Any]) -> Target | str:
    handles = shard_handles(ctx, tier)
    actor_id = handles[shard_id]._actor_id.hex()
    shards = actors_of_class("ShardActor")
    mine = [a for a in shards if a.actor_id == actor_id]
    if not mine:
        return f"shard {shard_id}'s actor {actor_id} is not alive"
    return Target(
        f"expert shard {shard_id}", mine[0], None, frozenset(a.pid for a in shards), facts
    )


def held_placement(ctx: Context, tier: str) -> list[tuple[Any, list[str]]]:
    """What the tier's shards hold now, as a placement (``[(slot, shard ids), ...]``)."""
    from ray import serve

    pool: Any = serve.get_deployment_handle(f"experts-{tier}", app_name=ctx.app)
    holders: dict[Any, list[str]] = {}
    for sid, slots in pool.slots.remote().result(timeout_s=30).items():
        for slot in slots:
            holders.setdefault(tuple(slot), []).append(sid)
    return sorted(holders.items())


def _replicated_shard(ctx: Context) -> Target | str:
    """The shard with the largest share of its slots held by another shard too (by what the
    shards hold; the controller's table is recorded beside it)."""
    held = replicated_share(held_placement(ctx, ctx.replicated_tier))
    if not held:
        return "the tier's shards hold nothing"
    sid = max(sorted(held), key=lambda s: held[s][0] / held[s][1])
    facts: dict[str, Any] = {"killed_shard_slots_held_elsewhere": "{}/{}".format(*held[sid])}
    table = controller_table(ctx.replicated_tier)
    if table is not None:
        in_table = replicated_share(table[1]).get(sid, (0, 0))
        facts["controller_table_version"] = table[0]
        facts["killed_shard_slots_replicated_in_table"] = "{}/{}".format(*in_table)
    return _shard_target(ctx, ctx.replicated_tier, sid, facts)


def expert_state(ctx: Context) -> dict[str, Any]:
    """After a fault: the replicated tier's table version at the controller, and how many of
    its (layer, expert) slots its live shards hold, at all and twice (or why unknown)."""
    import ray

    state: dict[str, Any] = {}
    try:
        table = controller_table(ctx.replicated_tier)
        state["controller_table_version"] = None if table is None else table[0]
    except (ValueError, ray.exceptions.RayError) as err:
        state["controller_table_version"] = f"unknown: {type(err).__name__}"
    try:
        held = held_placement(ctx, ctx.replicated_tier)
    except (ValueError, TimeoutError, ray.exceptions.RayError) as err:
        state["slots_held"] = f"unknown: {type(err).__name__}"
        return state
    state["slots_held"] = len(held)
    state["slots_held_twice_or_more"] = sum(len(set(shards)) > 1 for _, shards in held)
    return state


def _plain_shard(ctx: Context) -> Target | str:
    sid = sorted(shard_handles(ctx, ctx.plain_tier))[0]
    return _shard_target(ctx, ctx.plain_tier, sid, {"killed_shard_slots_held_elsewhere": "0"})


def _new_shard_process(ctx: Context, target: Target, timeout_s: float) -> float | None:
    """A shard process that did not run before the kill (the actor restarted, or its pool's
    replica was replaced with new shards)."""
    return _timed(
        lambda: any(a.pid not in target.before_pids for a in actors_of_class("ShardActor")),
        timeout_s,
        "a new expert shard process",
    )


# ----------------------------------------------------------------------------- node


def _worker_node(ctx: Context) -> Target | str:
    """A worker node without the gateway (its loss is the gateway scenario's): b, unless the
    gateway runs there. Either holds a shard of each tier and a store shard."""
    gateways = {a.node_id for a in actors_named(_replica_prefix(ctx, "gateway"))}
    label = "a" if ctx.workers["b"].node_id in gateways else "b"
    node = ctx.workers[label]
    if node.node_id in gateways:
        return "the gateway runs on both worker nodes"
    on_node = [a.name or a.class_name for a in _actors_on(node.node_id)]
    facts = {"actors_on_node": sorted(on_node)}
    return Target(f"worker node {label} ({node.node_id[:8]})", None, node, facts=facts)


def _actors_on(node_id: str) -> list[ActorProcess]:
    return live_actors(lambda a: a.node_id == node_id)


def _no_replacement(ctx: Context, target: Target, timeout_s: float) -> float | None:
    return None


def scenarios(ctx: Context) -> list[Scenario]:
    """In the order run: the lighter faults first, the controller after the shard faults (so
    that they meet the controller that placed the experts), the node last (it does not come
    back)."""
    strong, plain = ctx.replicated_tier, ctx.plain_tier
    return [
        Scenario("kv_store_shard_killed", strong, _store_shard, _same_name_back),
        Scenario("backbone_killed", strong, _backbone, _replica_back),
        Scenario("shard_killed_replicated", strong, _replicated_shard, _new_shard_process),
        Scenario("shard_killed_no_replica", plain, _plain_shard, _new_shard_process),
        Scenario("controller_killed", strong, _controller, _controller_back),
        Scenario("gateway_killed", strong, _gateway, _replica_back),
        Scenario("worker_node_removed", strong, _worker_node, _no_replacement),
    ]
