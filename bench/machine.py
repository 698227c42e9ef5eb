"""What else is running on the machine: the benches wait for quiet and record what they saw."""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def cpu_busy_fraction(interval_s: float = 0.5) -> float:
    """Share of all CPUs busy (steal included) over ``interval_s``; NaN without /proc/stat.

    Called while the bench itself is idle, so it measures other work competing for the cores.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else float("nan")


def load_average() -> float:
    """1-minute load average (NaN where the OS has none): other work competing for the cores."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def wait_for_quiet(
    max_wait_s: float, threshold: float, interval_s: float = 0.5
) -> tuple[float, float]:
    """Wait (up to ``max_wait_s``) until other work uses under ``threshold`` of the CPUs.

    On a small shared machine another busy process makes torch's spinning worker threads
    many times slower and starves Ray's workers (niceness 15), so a timed run started during
    a burst measures the burst, not the code. Returns (busy share seen last, seconds waited).
    """
    start = time.perf_counter()
    while True:
        busy = cpu_busy_fraction(interval_s)
        waited = time.perf_counter() - start
        if not busy >= threshold or waited >= max_wait_s:  # NaN: no /proc/stat, do not wait
            return busy, waited


def machine_summary(load_start: float) -> dict[str, Any]:
    """CPU count, torch version and threads, Python, and the load average when the run began."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": round(load_start, 2),
    }
