"""The small mixed workload of bench/engine_throughput.py: little padding for static batches to
waste, so the ratio shows our per-token cost rather than transformers' padding.

``--mixed-requests`` requests (default 24; quick 8), prompts 32-192 tokens, outputs 32-96
(quick: 16-64 and 8-24), fixed seed; our engine gets them all at t=0, transformers runs them
in static batches of ``--hf-batch-size``. ``--mixed-rounds`` rounds of each (ours while our
model is loaded, transformers' after, so each phase holds one model); the target is the median
over rounds of ours / transformers, round i against round i, all in the same run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.engine_runs import BenchConfig, EngineRun, Request, engine_config, run_engine
from bench.harness import median
from bench.transformers_runs import HFRun, run_hf_static
from experts.model import MoEModel

MIXED_GOAL = 2.0  # ours / transformers static batches on the mixed workload, at least


def mixed_config(cfg: BenchConfig, num_requests: int | None) -> BenchConfig:
    """The main workload's settings with the mixed workload's sizes."""
    quick = cfg.quick
    return dataclasses.replace(
        cfg,
        seed=cfg.seed + 1,
        num_requests=num_requests or (8 if quick else 24),
        prompt_len=(16, 64) if quick else (32, 192),
        output_len=(8, 24) if quick else (32, 96),
    )


@dataclass
class MixedRuns:
    """Per round: our engine's and transformers' useful output tok/s on the mixed workload."""

    requests: list[Request]
    ours: list[EngineRun] = field(default_factory=list)
    hf: list[HFRun] = field(default_factory=list)

    def run_ours(self, model: MoEModel, cfg: BenchConfig, rounds: int) -> None:
        for i in range(rounds):
            name = f"ours, mixed round {i + 1}"
            self.ours.append(run_engine(name, model, engine_config(cfg), self.requests))

    def run_hf(self, hf: Any, batch_size: int, rounds: int) -> None:
        for _ in range(rounds):
            self.hf.append(run_hf_static(hf, self.requests, batch_size))

    @property
    def ratios(self) -> list[float]:
        return [o.tok_s / h.tok_s for o, h in zip(self.ours, self.hf, strict=True)]

    def to_json(self, run_json: Callable[[EngineRun], dict[str, Any]]) -> dict[str, Any]:
        ours_tok_s = [r.tok_s for r in self.ours]
        hf_tok_s = [r.tok_s for r in self.hf]
        return {
            "num_requests": len(self.requests),
            "prompt_tokens": sum(len(r.prompt) for r in self.requests),
            "output_tokens": sum(r.max_tokens for r in self.requests),
            "ratio_per_round": self.ratios,
            "ratio_median": median(self.ratios),
            "ratio_of_medians": median(ours_tok_s) / median(hf_tok_s),
            "ours_tok_s_per_round": ours_tok_s,
            "transformers_tok_s_per_round": hf_tok_s,
            "transformers_padded_prompt_tokens": self.hf[0].padded_prompt_tokens,
            "transformers_generated_tokens_incl_padding": self.hf[0].generated_tokens,
            "ours_first_round": run_json(self.ours[0]),
            "tokens_equal_transformers_padded": _matching(self.ours[0], self.hf[0]),
        }


def _matching(ours: EngineRun, hf: HFRun) -> str:
    same = sum(ours.tokens[k] == hf.tokens[k] for k in ours.tokens)
    return f"{same} of {len(ours.tokens)}"


def summary_line(runs: MixedRuns) -> str:
    ours = ", ".join(f"{r.tok_s:.1f}" for r in runs.ours)
    hf = ", ".join(f"{r.tok_s:.1f}" for r in runs.hf)
    ratios = ", ".join(f"{x:.2f}" for x in runs.ratios)
    return f"mixed workload tok/s: ours {ours}; transformers {hf}; ratios {ratios}"
