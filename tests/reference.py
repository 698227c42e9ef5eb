"""transformers as the oracle: greedy tokens for a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers


def reference_model(path: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # else generate() merges eos back in
    return model


def reference_greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    """``new`` greedy tokens from transformers ``generate``, never stopping early."""
    config = transformers.GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    assert out.shape[1] == len(prompt) + new, "the reference stopped early"
    return out[0, len(prompt) :].tolist()
