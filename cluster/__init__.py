"""Running the system on Ray, in subpackages by concern.

- ``cluster.engine``: the step loop, the scheduler, the model runner and the two transports
  (in-process, child process) that drive one loop.
- ``cluster.serving``: tier replicas and the one client the gateway calls them through.
- ``cluster.expert_parallel``: the shard pool, the data plane, the remote expert backend.
- ``cluster.telemetry``: OpenTelemetry setup, exporters, metrics, trace files.

Nothing here contains model maths (that is ``experts/``) or imports ``deploy/``.
"""
