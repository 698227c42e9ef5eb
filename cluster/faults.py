"""Fault injection for tests and ``bench/reliability.py``: find a live actor's process and kill
it the way a crash does (SIGKILL, no shutdown hook runs), and wait for its replacement.

Reads Ray's global control store (no dashboard needed), so it works on a local instance and
on a ``ray.cluster_utils.Cluster``, whose nodes are processes of this machine. On a real
multi-machine cluster the kill must run on the actor's node; ``kill_actor_process`` refuses
a process that is not on this machine rather than killing the wrong one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class ActorProcess:
    """One live actor: its name (empty when unnamed), class, process id and node."""

    actor_id: str
    name: str
    class_name: str
    pid: int
    node_id: str


def live_actors(match: Callable[[ActorProcess], bool] | None = None) -> list[ActorProcess]:
    """Every ALIVE actor of the connected Ray instance (that ``match`` accepts), by name."""
    found = []
    for actor_id, info in ray._private.state.actors().items():
        if info.get("State") != "ALIVE" or not info.get("Pid"):
            continue
        actor = ActorProcess(
            actor_id=actor_id,
            name=info.get("Name") or "",
            class_name=info.get("ActorClassName") or "",
            pid=int(info["Pid"]),
            node_id=(info.get("Address") or {}).get("NodeID", ""),
        )
        if match is None or match(actor):
            found.append(actor)
    return sorted(found, key=lambda a: (a.name, a.actor_id))


def actors_named(prefix: str) -> list[ActorProcess]:
    """The live actors whose name starts with ``prefix`` (Serve replicas are named
    ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    return live_actors(lambda a: a.name.startswith(prefix))


def actors_of_class(class_name: str) -> list[ActorProcess]:
    """The live actors whose class name contains ``class_name``."""
    return live_actors(lambda a: class_name in a.class_name)


def kill_actor_process(actor: ActorProcess) -> None:
    """SIGKILL the actor's worker process: a crash, not a polite ``ray.kill``."""
    try:
        os.kill(actor.pid, 0)
    except ProcessLookupError:
        raise RuntimeError(
            f"actor {actor.name or actor.actor_id} (pid {actor.pid}) is not a process of this "
            "machine; run the kill on its node"
        ) from None
    os.kill(actor.pid, signal.SIGKILL)


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2
) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Raises naming ``what``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic() - start


def wait_for_replacement(killed: ActorProcess, prefix: str, timeout_s: float = 60.0) -> float:
    """Wait until a live actor named with ``prefix`` runs in a process other than the killed
    one (a restarted actor keeps its name and id, a replaced Serve replica takes a new name);
    the seconds it took."""
    return wait_until(
        lambda: any(a.pid != killed.pid for a in actors_named(prefix)),
        timeout_s,
        f"a replacement for {killed.name or killed.actor_id}",
    )
