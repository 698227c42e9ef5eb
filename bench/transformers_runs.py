"""transformers ``generate`` for the benches: greedy, no EOS stop, left-padded batches."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from bench.engine_runs import Request, peak_rss_mib, reset_peak_rss
from bench.harness import load_average, say
from deploy.demo_model import PAD_ID


@dataclass
class HFRun:
    wall_s: float
    batch_wall_s: list[float]
    useful_tokens: int  # each request's own max_tokens
    generated_tokens: int  # rows x the batch's longest max_tokens (padding included)
    padded_prompt_tokens: int
    prompt_tokens: int
    peak_rss_mib: float
    tokens: dict[str, list[int]]
    cpu_s: float
    load_average: tuple[float, float]

    @property
    def tok_s(self) -> float:
        return self.useful_tokens / self.wall_s


def hf_generate(
    hf: transformers.PreTrainedModel, prompts: Sequence[Sequence[int]], new_tokens: int
) -> list[list[int]]:
    """Greedy, no EOS, left-padded batch; returns ``new_tokens`` ids per row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )
    with torch.inference_mode():
        # mypy sees PreTrainedModel.generate as a Module attribute (Tensor | Module)
        generator: Any = hf
        out = generator.generate(ids, attention_mask=mask, generation_config=config)
    generated = out[:, width:]
    assert generated.shape[1] == new_tokens, tuple(generated.shape)
    return [list(map(int, row)) for row in generated.tolist()]


def load_hf(model_dir: Path) -> transformers.PreTrainedModel:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # else generate merges the checkpoint's EOS back in
    hf.generation_config.pad_token_id = PAD_ID
    return hf


def run_hf_static(
    hf: transformers.PreTrainedModel, requests: Sequence[Request], batch_size: int
) -> HFRun:
    tokens: dict[str, list[int]] = {}
    batch_walls: list[float] = []
    generated = padded_prompt = 0
    gc.collect()
    reset_peak_rss()
    load_start, cpu0 = load_average(), time.process_time()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        longest = max(r.max_tokens for r in batch)
        t = time.perf_counter()
        rows = hf_generate(hf, [r.prompt for r in batch], longest)
        batch_walls.append(time.perf_counter() - t)
        generated += len(batch) * longest
        padded_prompt += len(batch) * max(len(r.prompt) for r in batch)
        for r, row in zip(batch, rows, strict=True):
            tokens[r.request_id] = row[: r.max_tokens]
        say(
            f"  transformers batch {start // batch_size + 1}: {len(batch)} requests, "
            f"{longest} steps, {batch_walls[-1]:.1f}s"
        )
    return HFRun(
        wall_s=sum(batch_walls),
        batch_wall_s=batch_walls,
        useful_tokens=sum(r.max_tokens for r in requests),
        generated_tokens=generated,
        padded_prompt_tokens=padded_prompt,
        prompt_tokens=sum(len(r.prompt) for r in requests),
        peak_rss_mib=peak_rss_mib(),
        tokens=tokens,
        cpu_s=time.process_time() - cpu0,
        load_average=(load_start, load_average()),
    )


def check_requests(requests: Sequence[Request], count: int) -> list[Request]:
    """The shortest-prompt and the longest-prompt requests (then the next ones by length)."""
    by_len = sorted(requests, key=lambda r: (len(r.prompt), r.request_id))
    picked: list[Request] = []
    while len(picked) < min(count, len(by_len)):
        picked.append(by_len.pop(0) if len(picked) % 2 == 0 else by_len.pop())
    return picked
