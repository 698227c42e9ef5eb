"""cluster.faults on a local Ray instance: a SIGKILLed actor is seen dead, and a restartable
one comes back in a new process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray

from cluster.faults import actors_named, kill_actor_process, wait_for_replacement, wait_until


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=1)
class _Victim:
    def pid(self) -> int:
        return os.getpid()


def test_a_killed_actor_restarts_in_a_new_process(local_ray: None) -> None:
    victim = _Victim.options(name="faults-victim").remote()  # type: ignore[attr-defined]
    pid = ray.get(victim.pid.remote())
    (found,) = actors_named("faults-victim")
    assert found.pid == pid and found.class_name.endswith("_Victim")
    kill_actor_process(found)
    wait_for_replacement(found, "faults-victim", timeout_s=60)
    assert ray.get(victim.pid.remote()) != pid


def test_a_process_not_on_this_machine_is_refused(local_ray: None) -> None:
    victim = _Victim.options(name="faults-other").remote()  # type: ignore[attr-defined]
    ray.get(victim.pid.remote())
    (found,) = actors_named("faults-other")
    ghost = found.__class__(found.actor_id, found.name, found.class_name, 2**22 + 7, "x")
    with pytest.raises(RuntimeError, match="not a process of this machine"):
        kill_actor_process(ghost)
    with pytest.raises(TimeoutError, match="never did not happen"):
        wait_until(lambda: False, 0.3, "never")
