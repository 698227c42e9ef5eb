"""Telemetry: OpenTelemetry setup, exporters, metrics, the JSON-lines trace file, step traces.

Owns what a process exports (``settings``, with the ``OTEL_*`` variables), how spans and
metrics leave it (``setup``, ``exporters``, ``metrics``), the span file format that
``moe-cluster traces`` reads (``trace_file``) and the per-step dispatch record (``step_trace``).
Torch-free: the gateway imports it.

May import only the OpenTelemetry SDK and the standard library: every other package may import it.
"""
