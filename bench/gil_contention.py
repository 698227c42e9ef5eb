"""What other Python work beside the engine costs it: in the engine's process, or in another.

A tier replica whose engine runs on a thread of its own process shares the GIL with Serve's
threads (request handling, streaming each item back). This bench measures what such work
costs the engine, the serving path taken out: the in-process engine (one torch thread, as a
replica's) serves a closed loop of ``C`` asyncio clients while a bursty pure-Python load
(1 ms bursts, on average ``--duty`` of a core) runs

- nowhere (the baseline),
- on a thread of the engine's process (it competes for the GIL and a CPU), or
- in another process (it competes for a CPU only; the machine has a second core).

The three alternate over ``--rounds`` rounds on one warmed engine; each figure is the median
of the rounds' throughput over the baseline's in the same round. No target: the figures say
where a replica's lost throughput goes. Writes ``bench/results/gil_contention.json``.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import torch

from bench.harness import demo_checkpoint, median, model_label, parser, quick_or, write_results
from bench.serving import InProcess, LevelResult, Request, workload

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


def measure(
    local: InProcess, mode: str, duty: float, concurrency: int, requests: list[Request]
) -> float:
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
        result = LevelResult(mode, concurrency)
        local.level(concurrency, requests, result)
    finally:
        if worker is not None:
            stop.set()
            worker.join()
    return result.tokens_per_s


def main(argv: list[str] | None = None) -> None:
    p = parser("gil_contention", __doc__)
    p.add_argument(
        "--duty",
        type=float,
        action="append",
        help="share of a core the Python load takes, in (0, 1) (repeatable; default 0.1, 0.3)",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    args = p.parse_args(argv)
    duties = args.duty or ([0.3] if args.quick else [0.1, 0.3])
    for duty in duties:
        if not 0 < duty < 1:
            p.error(f"--duty {duty} must be between 0 and 1")
    started = time.perf_counter()
    rounds = quick_or(args, args.rounds, 1, 3)
    concurrency = 8 if args.quick else 32
    max_tokens = 16 if args.quick else 64
    torch.set_num_threads(1)  # as a tier replica's engine (Ray's OMP_NUM_THREADS for 0.5 CPU)
    model = demo_checkpoint("tiny")
    from deploy.config import default_config

    requests = workload(4 * concurrency, max_tokens, seed=concurrency)
    local = InProcess(model, default_config().tier("strong").to_engine_config())
    rates: dict[tuple[float, str], list[float]] = {}
    try:
        local.level(concurrency, requests, LevelResult("warm", concurrency))
        for i in range(rounds):
            for duty in duties:
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    rate = measure(local, mode, duty, concurrency, requests)
                    rates.setdefault((duty, mode), []).append(rate)
                    print(f"  round {i + 1} duty {duty:.2f} {mode:<8} {rate:7.1f} tok/s")
    finally:
        local.close()
    rows = []
    print(f"{'duty':>6}{'load in':>10}{'tok/s':>9}{'vs none':>9}")
    for duty in duties:
        base = rates[(duty, "none")]
        for mode in MODES:
            mine = rates[(duty, mode)]
            ratio = median([m / b for m, b in zip(mine, base, strict=True)])
            rows.append(
                {
                    "duty": duty,
                    "load_in": mode,
                    "tokens_per_s_median": round(median(mine), 1),
                    "rounds_tokens_per_s": [round(r, 1) for r in mine],
                    "vs_none": round(ratio, 3),
                }
            )
            print(f"{duty:>6.2f}{mode:>10}{median(mine):>9.1f}{ratio:>9.3f}")
    report = {
        "model": model_label(model),
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "requests_per_round": len(requests),
        "rounds": rounds,
        "burst_s": BURST_S,
        "rows": rows,
    }
    write_results(args, report, {}, started=started)  # no target: a diagnosis


if __name__ == "__main__":
    main()
