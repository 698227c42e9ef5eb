"""Expert parallelism: experts served by shards outside the backbone's process.

Owns the shard pool (which shard actors exist, and the transports that reach them), the data
plane (the framed per-layer tensor exchange and its channels) and the remote expert backend that
the model calls in place of its colocated experts.

May import ``experts/``, ``router/`` and ``cluster.telemetry``; never ``cluster.engine``,
``cluster.serving`` or ``deploy/``.
"""
