"""A step that needs an expert no shard can serve fails only the requests that chose it.

``RemoteExperts`` raises ``ExpertUnavailableError`` when some (layer, expert) has no live
replica within ``experts.unavailable_wait_s``, naming the step's token rows that routed to it.
Those rows belong to some of the step's chunks; their requests end (UNAVAILABLE, naming the
expert) and the step runs again without them, so a request that never chose the missing
expert goes on as if the fault had not happened (its tokens are the same: a token's routing
depends on its own sequence only). K/V the aborted pass wrote is rewritten by the rerun with
the same values, for the chunks that stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import accumulate

import torch

from cluster.engine.scheduler import ScheduledChunk, SchedulerOutput
from router.dispatch import ExpertUnavailableError


def chunks_of_rows(plan: SchedulerOutput, token_rows: tuple[int, ...]) -> set[int]:
    """The indices of the plan's chunks that own the step's ``token_rows`` (the forward
    pass lays the chunks' tokens out one after another, in plan order)."""
    ends = list(accumulate(c.num_tokens for c in plan.chunks))
    owners, chunk = set(), 0
    for row in sorted(token_rows):
        while chunk < len(ends) and row >= ends[chunk]:
            chunk += 1
        if chunk < len(ends):
            owners.add(chunk)
    return owners


def run_around_missing_experts(
    run: Callable[[SchedulerOutput], torch.Tensor], plan: SchedulerOutput
) -> tuple[SchedulerOutput, torch.Tensor | None, list[tuple[ScheduledChunk, str]]]:
    """Run ``plan``; while an expert is missing, drop the chunks whose tokens chose it and
    run the rest again. Returns the plan that ran, its logits (None when every chunk was
    dropped) and the dropped chunks with why. An error that names no rows (or rows outside
    the step) is raised: the step cannot be split, and the engine stops as before."""
    lost: list[tuple[ScheduledChunk, str]] = []
    while True:
        try:
            return plan, run(plan), lost
        except ExpertUnavailableError as err:
            rows = chunks_of_rows(plan, err.token_rows)
            if not rows or err.num_tokens != plan.num_tokens:
                raise
            reason = f"ExpertUnavailableError: {err}"
            lost += [(c, reason) for i, c in enumerate(plan.chunks) if i in rows]
            kept = [c for i, c in enumerate(plan.chunks) if i not in rows]
            # the slot copies were made before the failed pass and are still in place
            plan = replace(plan, chunks=kept, copies=[])
            if not kept:
                return plan, None, lost
