"""The cluster KV store's settings: the config file's ``kv_store`` section (torch-free).

This frozen dataclass is the one definition: its defaults are the file's and ``__post_init__``
holds every check (``deploy.sections.runtime_section`` validates YAML through it), each error
starting ``<field>=<value>`` and naming the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prefill tokens below which recomputing beats fetching from the store, measured on this
# machine by ``python -m bench.multiturn`` (its "fetch_threshold" phase: the tiny demo model on
# CPU, a Ray store shard on the same node, 256 cached tokens before): one block (16 tokens)
# took 15.6 ms to compute and 12.6 ms to fetch, so fetching won from the smallest size tried
# (bench/results/multiturn.json keeps the rows). Set it per deployment: a GPU computes a
# prefill far faster than a network moves its K/V.
MEASURED_MIN_FETCH_TOKENS = 16
MAX_REPLICATION = 3
MAX_CAPACITY_BYTES = 1 << 40


@dataclass(frozen=True)
class KVStoreConfig:
    """A cluster KV store: one shard per node, blocks placed by consistent hashing."""

    enabled: bool = False
    capacity_bytes: int = 1 << 30  # host memory per shard (per node)
    replication: int = 1  # owners per block; 2 keeps blocks through a node loss
    virtual_nodes: int = 64  # points per shard on the hash ring
    # fetch from the store only when at least this many prompt tokens would come from it
    min_fetch_tokens: int = MEASURED_MIN_FETCH_TOKENS
    fetch_timeout_s: float = 0.5  # a fetch not answered by then is a miss (recompute)
    put_timeout_s: float = 2.0  # the publisher waits this long for a shard, then moves on
    publish_queue_blocks: int = 1024  # blocks waiting to be published; beyond: dropped
    max_pinned_share: float = 0.25  # pinned blocks' share of a cache (local or shard), at most
    # a tenant (of one model) holding this share of a shard evicts its own blocks to store
    # more, never another tenant's (with free room it may hold more)
    max_tenant_share: float = 0.5
    detached: bool = False  # shards outlive the application that started them
    retry_down_s: float = 5.0  # a failed shard is skipped this long, then tried again
    # how often a store client looks for nodes that joined (a shard is started there and
    # joins the hash ring) or left (their shard leaves it); 0: the nodes at start-up only
    membership_interval_s: float = 10.0
    # with the store on, tiers route each request to where its prefix lives (a Serve request
    # router fed by the engines' KV events); off: Serve's power-of-two choices
    prefix_routing: bool = True

    def __post_init__(self) -> None:
        checks: list[tuple[str, float, float, float]] = [
            ("capacity_bytes", self.capacity_bytes, 1 << 20, MAX_CAPACITY_BYTES),
            ("replication", self.replication, 1, MAX_REPLICATION),
            ("virtual_nodes", self.virtual_nodes, 1, 4096),
            ("min_fetch_tokens", self.min_fetch_tokens, 0, 1 << 20),
            ("fetch_timeout_s", self.fetch_timeout_s, 0.001, 60.0),
            ("put_timeout_s", self.put_timeout_s, 0.001, 600.0),
            ("publish_queue_blocks", self.publish_queue_blocks, 1, 1 << 20),
            ("max_pinned_share", self.max_pinned_share, 0.0, 1.0),
            ("max_tenant_share", self.max_tenant_share, 0.01, 1.0),
            ("retry_down_s", self.retry_down_s, 0.0, 3600.0),
            ("membership_interval_s", self.membership_interval_s, 0.0, 3600.0),
        ]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is out of range: allowed [{low:g}, {high:g}]")
