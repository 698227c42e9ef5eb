"""Make one request's row fail inside a real engine's step, for the tests of per-request
failure (the engine, its async API, the engine process, the tier replica)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.model_runner import StepInput


def fail_row(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch, request_id: str, after: int, how: str
) -> None:
    """From the first step where ``request_id`` has ``after`` tokens, its row fails: NaN
    logits from the model ("nan"), or a sampler that raises ("raise"; the request must not
    be greedy). Works from the engine's own thread too (the check runs inside its step)."""
    real_run = engine.runner.run

    def run(inputs: Sequence[StepInput], capture_routing: bool = False) -> torch.Tensor:
        logits = real_run(inputs, capture_routing=capture_routing)
        seq = next((s for s in engine.scheduler.running if s.request_id == request_id), None)
        if seq is None or len(seq.output_ids) < after:
            return logits
        if how == "raise":
            engine.samplers[request_id].pick = _raise  # type: ignore[method-assign]
            return logits
        with torch.inference_mode():
            for row, step_input in enumerate(inputs):
                if step_input.block_table is seq.block_table:
                    logits[row, 7] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "run", run)


def _raise(logits: torch.Tensor) -> int:
    raise RuntimeError("injected sampling failure")


# bos: test prompts draw from [3, 256), and the requests beside it in these tests never
# generate it (one that did would fail too, from its next step: the tests would say so)
POISONED_TOKEN = 1


def poison_token_embedding(model_dir: Path, token: int = POISONED_TOKEN) -> None:
    """Make a checkpoint's embedding of ``token`` NaN: a request whose prompt holds it gets
    NaN logits from the model itself (also in an engine process, where nothing can be patched).

    Keep it off a prompt's first position: the K/V of a sequence's position 0 can sit in
    the pool's slot 0, which attention reads (masked) as every sequence's key padding.
    """
    path = model_dir / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    tensors["model.embed_tokens.weight"][token] = float("nan")
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
