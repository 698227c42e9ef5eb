"""Which trace the engine step now running belongs to, for work done deep inside it.

A step computes many requests at once; when one of them is traced, the
expert-shard calls the step makes (``cluster.expert_parallel.remote_experts``) are recorded
under that request's trace. The engine sets the W3C ``traceparent`` around the
forward pass; backends read it without the model code having to pass it on.
A context variable keeps concurrent engines (threads) apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_STEP_TRACE: ContextVar[str] = ContextVar("moe_step_trace", default="")


@contextmanager
def step_trace(traceparent: str) -> Iterator[None]:
    token = _STEP_TRACE.set(traceparent)
    try:
        yield
    finally:
        _STEP_TRACE.reset(token)


def current_step_trace() -> str:
    """The traceparent of the step running in this thread, or "" when it is not traced."""
    return _STEP_TRACE.get()
