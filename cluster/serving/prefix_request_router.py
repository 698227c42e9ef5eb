"""Serve's request-router extension point for a tier: requests go where their prefix lives.

``PrefixAwareRequestRouter`` is the tier deployment's ``request_router_class``: Serve builds
one in every process that holds a handle to the tier (the gateway's replicas) and asks it to
rank the tier's replicas for each request. It names the request's full prompt blocks as the
engines do (the tenant's salt, the model and KV layout from the engines' own snapshots; a text
prompt is tokenized here, its first ``MAX_ROUTE_CHARS`` characters), and ranks replicas with
``router.prefix_router.PrefixRouter``: uncached prefill plus queued tokens, under a bounded
imbalance. Its ``PrefixIndex`` is fed by polling the tier's KV event hub every
``poll_interval_s`` on the router's event loop (``cluster.kv_store.event_hub``); until the hub
answers (or if it is gone) the index is empty and the choice is by load. Serve tries the first
rank, then the others by queued work. The queue figures are this router's own: work is added
when it routes, moved if Serve sent the request elsewhere, and removed when Serve reports the
request completed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cache.block_key import BlockKey, KeySpace
from cache.prefix_hash import hash_blocks, root_hash
from cluster.kv_store.event_hub import HUB_NAME_PREFIX, HubUpdate
from cluster.serving.tier_messages import TierRequest
from cluster.telemetry.setup import get_telemetry
from router.prefix_index import PrefixIndex
from router.prefix_router import Choice, PrefixRouter, PrefixRouterConfig
from router.route_notes import ROUTED_ELSEWHERE, note_routed_elsewhere

log = logging.getLogger(__name__)
MISS_ROUTED_ELSEWHERE = ROUTED_ELSEWHERE  # a miss reason only the router can tell
MAX_ROUTE_CHARS = 65_536  # of a text prompt tokenized for routing (its prefix is what counts)
_MAX_OPEN_CHOICES = 100_000  # routed requests not yet reported completed, at most


class PrefixAwareRequestRouter(RequestRouter):
    """Ranks a tier's replicas by uncached prefill + queued tokens (module doc)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """``tier``, ``model_dir`` (for the tokenizer), ``block_size``, and optionally
        ``poll_interval_s``, ``imbalance_factor``, ``slack_tokens``."""
        self.tier: str = kwargs["tier"]
        self.model_dir: str = kwargs.get("model_dir", "")
        config = PrefixRouterConfig(
            block_size=int(kwargs.get("block_size", 16)),
            imbalance_factor=float(kwargs.get("imbalance_factor", 1.5)),
            slack_tokens=int(kwargs.get("slack_tokens", 1024)),
        )
        self.poll_interval_s = float(kwargs.get("poll_interval_s", 0.05))
        self.router = PrefixRouter(PrefixIndex(), config)
        self.keyspace: KeySpace | None = None
        self._tokenizer: Any = None
        self._tokenizer_loaded = False
        self._choices: OrderedDict[str, Choice] = OrderedDict()
        self._poller: asyncio.Task[None] | None = None
        self.num_polls = self.num_poll_failures = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not by_id:
            return []
        for replica in by_id:
            self.router.add_replica(replica)
        request = _tier_request(pending_request)
        keys, num_tokens = self._keys(request)
        loads = {r: self.router.queued.get(r, 0.0) for r in by_id}
        choice = self.router.choose(
            keys,
            max(num_tokens, 1),
            request.params.max_tokens if request is not None else 0,
            request.session_id if request is not None else "",
            loads=loads,
        )
        if pending_request is not None:
            self._remember(pending_request.metadata.internal_request_id, choice)
        if choice.best_elsewhere > choice.cached_tokens:  # balance won over a better cache
            get_telemetry().metrics.record_kv_request(self.tier, 0, MISS_ROUTED_ELSEWHERE)
            if request is not None:  # for its usage, in this (the gateway's) process
                note_routed_elsewhere(request.request_id)
        rest = sorted((r for r in by_id if r != choice.replica), key=loads.__getitem__)
        return [[by_id[choice.replica]], [by_id[r] for r in rest]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        """Serve may have sent it to a lower rank: its work moves there."""
        choice = self._choices.get(pending_request.metadata.internal_request_id)
        actual = replica_id.unique_id
        if choice is not None and choice.replica != actual:
            self.router.done(choice)
            moved = Choice(actual, 0, choice.work_tokens, "balance")
            self.router.queued[actual] = self.router.queued.get(actual, 0.0) + moved.work_tokens
            self._choices[pending_request.metadata.internal_request_id] = moved

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        choice = self._choices.pop(internal_request_id, None)
        if choice is not None:
            self.router.done(choice)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for gone in [r for r in self.router.queued if r not in live]:
            self.router.remove_replica(gone)

    # --- internals --------------------------------------------------------------------------

    def _remember(self, request_id: str, choice: Choice) -> None:
        self._choices[request_id] = choice
        while len(self._choices) > _MAX_OPEN_CHOICES:  # completions never reported: forget
            _, old = self._choices.popitem(last=False)
            self.router.done(old)

    def _keys(self, request: TierRequest | None) -> tuple[list[BlockKey], int]:
        if request is None or self.keyspace is None:
            return [], _prompt_size(request)
        if request.token_ids is not None:
            ids = list(request.token_ids)
        else:
            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                return [], _prompt_size(request)
            text = (request.prompt or "")[:MAX_ROUTE_CHARS]
            ids = list(tokenizer.encode(text).ids)
        size = self.keyspace.layout.block_size
        hashes = hash_blocks(ids, size, root=root_hash(request.cache_salt))
        return self.keyspace.keys(request.cache_salt, hashes), len(ids)

    def _load_tokenizer(self) -> Any:
        if not self._tokenizer_loaded:
            self._tokenizer_loaded = True
            try:
                from experts.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.model_dir)
            except (OSError, ValueError) as err:  # not on this node: route text by load
                log.warning("tier %s: no tokenizer for routing (%r)", self.tier, err)
        return self._tokenizer

    async def _poll_forever(self) -> None:
        import ray

        hub: Any = None
        while ray.is_initialized():  # (a lookup after a shutdown would start Ray again)
            try:
                if hub is None:
                    hub = ray.get_actor(HUB_NAME_PREFIX + self.tier)
                update: HubUpdate = await hub.poll.remote(self._cursors())
                self._apply(update)
                self.num_polls += 1
            except Exception as err:  # no hub yet, or it restarted: look it up again
                hub = None
                self.num_poll_failures += 1
                if self.num_poll_failures % 100 == 1:
                    log.info("tier %s: KV event hub not reachable (%r)", self.tier, err)
            await asyncio.sleep(self.poll_interval_s)

    def _cursors(self) -> dict[str, tuple[str, int]]:
        return self.router.index.cursors()

    def _apply(self, update: HubUpdate) -> None:
        if update.keyspace is not None and self.keyspace is None:
            model_id, layout = update.keyspace
            self.keyspace = KeySpace(model_id, layout)
        for replica, batches in update.batches.items():
            if replica not in self.router.queued:
                continue  # not (or no longer) a replica Serve routes to
            for batch in batches:
                self.router.index.apply(replica, batch)


def _tier_request(pending: PendingRequest | None) -> TierRequest | None:
    if pending is None or not pending.args:
        return None
    request = pending.args[0]
    return request if isinstance(request, TierRequest) else None


def _prompt_size(request: TierRequest | None) -> int:
    """A rough token count without a tokenizer (about four characters a token)."""
    if request is None:
        return 0
    if request.token_ids is not None:
        return len(request.token_ids)
    return len(request.prompt or "") // 4
