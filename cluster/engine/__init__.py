"""The engine: one model on one device, stepped by a continuous-batching scheduler.

Owns the step loop (``loop``), the scheduler and its sequences (torch-free: ids and
integers), the model runner (the only module here that builds tensors), ``LLMEngine`` (schedule,
run, post-process) and its two transports: in-process (``async_engine``) and a child process
(``engine_process``), both driving the same loop.

May import ``experts/``, ``cache/``, ``router/`` and ``cluster.telemetry``; never
``cluster.serving`` or ``deploy/``. This ``__init__`` imports nothing, so the torch-free
modules stay torch-free.
"""
