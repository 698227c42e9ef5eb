"""Telemetry: OpenTelemetry setup, exporters, metrics, the JSON-lines trace file, step traces.

Owns how spans and metrics leave a process (``setup``, ``exporters``, ``metrics``), the span
file format that ``moe-cluster traces`` reads (``trace_file``) and the per-step dispatch record
(``step_trace``). Torch-free: the gateway imports it.

May import only the OpenTelemetry SDK and the standard library: every other package may import it.
"""
