"""What every bench shares: flags, progress, a quiet machine, its facts, percentiles, results.

Each bench runs from the repository root as ``.venv/bin/python -m bench.NAME`` (``--quick``
for a smoke run, ``--out`` for another file). It measures what it compares in the same run,
states each target on the median of its rounds, and hands :func:`write_results` its report
and targets; that adds the command, the machine, the run history of the file it replaces,
and writes ``bench/results/NAME[.variant][.quick].json`` with paths relative to the
repository (a demo checkpoint is named by its preset, never by where it lies).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEMO_DIR = REPO / ".demo-models"
HISTORY_LIMIT = 30  # previous runs kept in a results file
FIRST_ORDINARY_ID = 3  # ids 0..2 are <s>, </s>, <pad> in every demo preset
_name = "bench"


def say(message: str) -> None:
    """Progress, to stderr: stdout carries the bench's table."""
    print(f"[{_name}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- flags


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags every bench takes; the bench adds its own to the parser returned."""
    global _name
    _name = name
    first = (doc or name).strip().split("\n\n")[0]
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=first)
    p.add_argument("--quick", action="store_true", help="a small smoke run (minutes or less)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each measured phase, wait up to this many seconds for other processes to "
        "leave the CPUs under --quiet-threshold busy (default 20; quick: 0)",
    )
    p.add_argument("--quiet-threshold", type=float, default=0.25)
    return p


def quick_or(args: argparse.Namespace, value: Any, quick: Any, full: Any) -> Any:
    """``value`` when the flag was given, else the quick or the full default."""
    if value is not None:
        return value
    return quick if args.quick else full


# ----------------------------------------------------------------------------- machine


def cpu_busy_fraction(interval_s: float = 0.5) -> float:
    """Share of all CPUs busy (steal included) over ``interval_s``; NaN without /proc/stat.

    Called while the bench itself is idle, so it measures other work competing for the cores.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0)

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else float("nan")


def load_average() -> float:
    """1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def wait_for_quiet(args: argparse.Namespace) -> dict[str, float]:
    """Wait (up to ``--quiet-wait``) until other work uses under ``--quiet-threshold`` of the CPUs.

    On a small shared machine a busy neighbour makes torch's spinning threads many times slower
    and starves Ray's workers, so a phase started during a burst measures the burst. Returns
    what it saw, for the phase's record.
    """
    max_wait_s = quick_or(args, args.quiet_wait, 0.0, 20.0)
    start = time.perf_counter()
    while True:
        busy = cpu_busy_fraction(0.5)
        waited = time.perf_counter() - start
        if not busy >= args.quiet_threshold or waited >= max_wait_s:  # NaN: do not wait
            return {
                "others_cpu_busy_before": round(busy, 3),
                "quiet_wait_s": round(waited, 1),
                "load_1m_before": round(load_average(), 2),
            }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """CPU, library versions, torch threads, the knobs that change timings, the load now."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "ray"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    knobs = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RAY_worker_niceness")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in knobs if k in os.environ},
        "load_1m": round(load_average(), 2),
    }


# ----------------------------------------------------------------------------- checkpoints


def demo_checkpoint(preset: str) -> Path:
    """``.demo-models/PRESET``, built on first use (random weights, the demo tokenizer)."""
    from deploy.demo_model import build_demo_model, is_demo_model

    path = DEMO_DIR / preset
    if is_demo_model(path) and (path / "config.json").is_file():
        return path
    say(f"building the {preset!r} demo checkpoint into .demo-models/{preset} (once)")
    return build_demo_model(path, preset=preset, progress=lambda m: say(f"  build: {m}"))


def model_label(path: str | Path) -> str:
    """How a results file names a checkpoint: its demo preset, else a path in the repository."""
    marker = Path(path) / "demo_model.json"
    if marker.is_file():
        return f"demo preset {json.loads(marker.read_text())['preset']!r}"
    return _relative(str(path))


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100] (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(
    values: Sequence[float], qs: Sequence[float] = (50, 95, 99), scale: float = 1.0
) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` of ``values`` x ``scale``, rounded; None for an empty sample."""
    return {f"p{q:g}": round(percentile(values, q) * scale, 4) if values else None for q in qs}


def median(values: Sequence[float]) -> float:
    """The median of the rounds: what a target is judged on (never the best round)."""
    return float(statistics.median(values))


def target(value: float | int | None, goal: float | int, at_least: bool) -> dict[str, Any]:
    """One entry of a results file's ``targets``: value, goal, direction and met."""
    met = value is not None and (value >= goal if at_least else value <= goal)
    shown = round(value, 4) if isinstance(value, float) else value
    return {"value": shown, "goal": goal, "direction": ">=" if at_least else "<=", "met": met}


# ----------------------------------------------------------------------------- results


def _relative(text: str) -> str:
    """``text`` with the repository, home and temporary folders taken out of any path in it."""
    for root, label in (
        (str(REPO) + os.sep, ""),
        (str(REPO), "."),
        (tempfile.gettempdir() + os.sep, "<tmp>/"),
        (str(Path.home()) + os.sep, "~/"),
    ):
        text = text.replace(root, label)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _relative(value)
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def results_path(args: argparse.Namespace, variant: str = "") -> Path:
    """``--out``, else ``bench/results/NAME[.variant][.quick].json``."""
    if args.out is not None:
        return Path(args.out)
    return RESULTS / f"{_name}{variant}{'.quick' if args.quick else ''}.json"


def _history(path: Path) -> list[dict[str, Any]]:
    """The replaced file's history, with that file's own run (its target values) first."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or not isinstance(old.get("targets"), dict):
        return []
    values = {k: t.get("value") for k, t in old["targets"].items() if isinstance(t, dict)}
    last = {"timestamp": old.get("timestamp"), "command": old.get("command"), "targets": values}
    return [last, *old.get("history", [])][:HISTORY_LIMIT]


def write_results(
    args: argparse.Namespace,
    report: Mapping[str, Any],
    targets: Mapping[str, Mapping[str, Any]],
    variant: str = "",
    started: float | None = None,
) -> Path:
    """Print the targets and write the results file (relative paths only, history kept)."""
    path = results_path(args, variant)
    command = " ".join(["python -m", f"bench.{_name}", *sys.argv[1:]])
    payload: dict[str, Any] = {
        "benchmark": _name,
        "command": command,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": bool(args.quick),
        "targets": dict(targets),
        **report,
        "machine": machine_facts(),
    }
    if started is not None:
        payload["wall_s"] = round(time.perf_counter() - started, 1)
    payload["history"] = _history(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_scrub(payload), indent=2) + "\n")
    for name, t in targets.items():
        status = "met" if t["met"] else "NOT met"
        print(f"target {name}: {t['value']} (goal {t.get('direction', '')} {t['goal']}) {status}")
    say(f"wrote {_relative(str(path))}")
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn`` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First differing position over the common length; the shorter length if only that differs."""
    for pos, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return pos
    return None if len(a) == len(b) else min(len(a), len(b))
