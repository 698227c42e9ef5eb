"""The model core against transformers, the correctness oracle, for every supported family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cache.kv_pool import KVPool
from cluster.engine.generator import generate
from experts.attention import AttentionBatch, SequenceChunk
from experts.backend import ColocatedExperts
from experts.checkpoint import CheckpointReader
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from experts.weights import expert_tensor_names, load_backbone
from tests.checkpoints import FAMILIES, build_family_checkpoint
from tests.reference import reference_greedy, reference_model

BLOCK = 16
PROMPT_LENS = (37, 5, 20, 16)  # longer than a block, shorter, ragged, exactly one block


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _reference_greedy(path: Path, prompt: list[int], new: int) -> list[int]:
    return reference_greedy(reference_model(path), prompt, new)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(
    family: str, family_checkpoints: dict[str, Path]
) -> None:
    model = MoEModel.from_checkpoint(family_checkpoints[family])
    spec = model.spec
    prompts = _prompts(spec.vocab_size)
    # scattered, non-contiguous block tables: paging must not depend on layout
    pool = KVPool(spec.num_layers, 64, BLOCK, spec.num_kv_heads, spec.head_dim)
    free = list(range(63, -1, -3)) + list(range(61, -1, -3))
    chunks = []
    for p in prompts:
        need = -(-len(p) // BLOCK)
        chunks.append(SequenceChunk([free.pop() for _ in range(need)], 0, len(p), 0))
    batch = AttentionBatch.build(chunks, BLOCK, model.device)
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.inference_mode():
        ours = model.logits(model.forward(ids, batch, pool))
        ref = reference_model(family_checkpoints[family])
        offset = 0
        for p in prompts:
            expected = ref(torch.tensor([p])).logits[0]
            got = ours[offset : offset + len(p)]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            offset += len(p)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_token_identical(
    family: str, family_checkpoints: dict[str, Path]
) -> None:
    model = MoEModel.from_checkpoint(family_checkpoints[family])
    prompts = _prompts(model.spec.vocab_size, seed=1)
    new = 24
    results = generate(model, prompts, [SamplingParams(max_tokens=new, ignore_eos=True)] * 4)
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == _reference_greedy(family_checkpoints[family], prompt, new)
        assert res.finish_reason == "length"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "qwen3")])
def test_loading_chosen_experts_reads_only_their_tensors(
    family: str, family_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import experts.checkpoint as ckpt

    read: list[str] = []
    real_safe_open = ckpt.safe_open

    class Recording:
        """Wraps safe_open to record every tensor whose data is read."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self._inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self._handle.keys())

        def get_slice(self, name: str) -> Any:
            return self._handle.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(ckpt, "safe_open", Recording)
    reader = CheckpointReader(family_checkpoints[family])
    spec = reader.spec
    last = spec.moe_layers[-1]
    pairs = [(spec.moe_layers[0], 1), (last, spec.num_experts - 1)]
    experts = ColocatedExperts.from_checkpoint(reader, pairs)
    expected = {n for layer, e in pairs for n in expert_tensor_names(spec, layer, e)}
    assert set(read) == expected and len(read) == len(expected)
    assert experts.pairs == sorted(pairs)

    read.clear()
    load_backbone(reader)
    assert read, "the backbone load read nothing"
    assert not [n for n in read if ".experts." in n], "backbone load read expert tensors"


def test_sharded_checkpoint_and_tied_embeddings(tmp_path: Path) -> None:
    path = build_family_checkpoint(
        "qwen3", tmp_path / "q", seed=3, sharded=True, tie_word_embeddings=True
    )
    assert (path / "model.safetensors.index.json").is_file()
    model = MoEModel.from_checkpoint(path)
    assert model.weights.lm_head is model.weights.embed
    prompt = _prompts(model.spec.vocab_size)[0]
    res = generate(model, [prompt], [SamplingParams(max_tokens=24, ignore_eos=True)])
    assert res[0].token_ids == _reference_greedy(path, prompt, 24)
