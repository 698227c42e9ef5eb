"""Expert parallelism: experts served by shards outside the backbone's process.

Owns the shard actor (``shard_actor``), the pool that makes its control calls
(``expert_pool``) and the pool's transports behind one protocol, chosen by name from a
registry (``transports``), the data plane (``wire``: framing, key handshake, payload limits;
``data_plane``: the backbone's channel; ``channel_server``: the shard's loops; ``shm_link``:
same-node pairs over shared memory), the remote expert backend that
the model calls in place of its colocated experts (``remote_experts``), and the recipe an
engine process builds that backend from without Ray calls (``engine_experts``).

May import ``experts/``, ``router/`` and ``cluster.telemetry``; never ``cluster.engine``,
``cluster.serving`` or ``deploy/``.
"""
