"""The engine: one model on one device, stepped by a continuous-batching scheduler.

Owns the scheduler and its sequences with their block bookkeeping (torch-free: ids and
integers), the model runner (the only module here that builds tensors), ``LLMEngine``
(schedule, run the model, post-process), the one step loop (``loop``) and how an engine is
built (``launch``), and the async API over its two transports (``client``, ``streams``):
in-process (``async_engine``, the loop on a thread) and a child process
(``engine_process``, the loop in the child, the streams in the parent).

May import ``experts/``, ``cache/``, ``router/`` and ``cluster.telemetry``; never
``cluster.serving`` or ``deploy/``. This ``__init__`` imports nothing, so the torch-free
modules stay torch-free.
"""
