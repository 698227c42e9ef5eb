"""What other Python work beside the engine costs it: in the engine's process, or in another.

A tier replica runs its engine on a thread of the Serve replica process, beside Serve's
own threads (request handling, streaming each item back), which run Python under the
same GIL. This bench measures what such work costs the engine, with the serving path
taken out: the in-process engine (one torch thread, as a replica's) serves a closed
loop of ``C`` asyncio clients while a bursty pure-Python load (1 ms bursts, on average
``--duty`` of a core) runs

- nowhere (the baseline),
- on a thread of the engine's process (it competes for the GIL and a CPU), or
- in another process (it competes for a CPU only; the machine has a second core).

The three alternate over ``--rounds`` rounds on one warmed engine. No target: the figures
say where a replica's lost throughput goes. Writes ``bench/results/gil_contention.json``.
Run: ``.venv/bin/python bench/gil_contention.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` when run as a script

from bench.machine import load_average, machine_summary
from bench.serve_load import DEMO_DIR, InProcess, LevelResult, workload

OUT = Path(__file__).resolve().parent / "results"
MODES = ("none", "thread", "process")
BURST_S = 0.001


def burn(ready: Any, stop: Any, duty: float) -> None:
    """Python work in bursts of ``BURST_S``, sleeping between so it averages ``duty`` of a core."""
    ready.set()
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < BURST_S:
            sum(i * i for i in range(50))
        time.sleep(BURST_S * (1 - duty) / duty)


def measure(local: InProcess, mode: str, duty: float, concurrency: int, requests: Any) -> float:
    worker: threading.Thread | multiprocessing.process.BaseProcess | None = None
    ready: Any = None
    stop: Any = None
    if mode == "thread":
        ready, stop = threading.Event(), threading.Event()
        worker = threading.Thread(target=burn, args=(ready, stop, duty), daemon=True)
    elif mode == "process":
        context = multiprocessing.get_context("spawn")  # never fork a process with threads
        ready, stop = context.Event(), context.Event()
        worker = context.Process(target=burn, args=(ready, stop, duty), daemon=True)
    if worker is not None:
        worker.start()
        if not ready.wait(120):  # a spawned process imports this module first
            raise RuntimeError(f"the {mode} load did not start")
    try:
        result = LevelResult(mode, concurrency, 0, 0, 0.0, 0)
        local.level(concurrency, requests, result)
    finally:
        if worker is not None:
            stop.set()
            worker.join()
    return result.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--duty",
        type=float,
        action="append",
        help="share of a core the Python load takes, in (0, 1) (repeatable; default 0.1, 0.3)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    args = parser.parse_args()
    duties = args.duty or ([0.3] if args.quick else [0.1, 0.3])
    for duty in duties:
        if not 0 < duty < 1:
            parser.error(f"--duty {duty} must be between 0 and 1")
    rounds = args.rounds or (1 if args.quick else 3)
    concurrency = 8 if args.quick else 32
    max_tokens = 16 if args.quick else 64

    from deploy.config import default_config
    from deploy.up import ensure_demo_models

    torch.set_num_threads(1)  # as a tier replica's engine (Ray's OMP_NUM_THREADS for 0.5 CPU)
    ensure_demo_models(DEMO_DIR)
    tier = default_config(DEMO_DIR).tier("strong")
    requests = workload(4 * concurrency, max_tokens, seed=concurrency)
    load_start = load_average()
    local = InProcess(Path(tier.model), tier.to_engine_config())
    rates: dict[tuple[float, str], list[float]] = {}
    try:
        local.level(concurrency, requests, LevelResult("warm", concurrency, 0, 0, 0.0, 0))
        for i in range(rounds):
            for duty in duties:
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    rate = measure(local, mode, duty, concurrency, requests)
                    rates.setdefault((duty, mode), []).append(rate)
                    line = f"  round {i + 1} duty {duty:.2f} {mode:<8} {rate:7.1f} tok/s"
                    print(line, flush=True)
    finally:
        local.close()

    rows = []
    print(f"{'duty':>6}{'load in':>10}{'tok/s':>9}{'vs none':>9}")
    for duty in duties:
        base = sum(rates[(duty, "none")]) / rounds
        for mode in MODES:
            mean = sum(rates[(duty, mode)]) / rounds
            rows.append(
                {
                    "duty": duty,
                    "load_in": mode,
                    "tokens_per_s": round(mean, 1),
                    "rounds_tokens_per_s": [round(r, 1) for r in rates[(duty, mode)]],
                    "vs_none": round(mean / base, 3),
                }
            )
            print(f"{duty:>6.2f}{mode:>10}{mean:>9.1f}{mean / base:>9.3f}")
    result = {
        "benchmark": "gil_contention",
        "quick": args.quick,
        "model": tier.model,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "requests_per_round": len(requests),
        "rounds": rounds,
        "burst_s": BURST_S,
        "rows": rows,
        "targets": {},  # no target: a diagnosis of where a replica's throughput goes
        "machine": machine_summary(load_start),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"gil_contention{'.quick' if args.quick else ''}.json"
    (OUT / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
