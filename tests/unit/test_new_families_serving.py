"""GLM-4.5 MoE, DeepSeek-V3 and gpt-oss served the way the cluster serves them.

Remote expert shards (``InProcessPool``: real shard bodies, the remote backend's dispatch
and combine, no Ray) give transformers' greedy tokens; gpt-oss's fused experts are read by
each shard as slices of its own experts only; the routing a request asks for
(``return_routing``) is the reference gate's choice; placement counts cover the MoE layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from cluster.engine.config import EngineConfig
from cluster.engine.generator import generate
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.remote_experts import RemoteExperts
from experts.checkpoint import CheckpointReader
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from experts.shard import ExpertShard
from experts.weights import expert_tensor_names, load_backbone
from router.routing_table import round_robin
from tests.checkpoints import BuildCheckpoint
from tests.reference import reference_greedy, reference_model

SERVED = ("glm4_moe", "deepseek_v3", "gpt_oss")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(shared_checkpoint: BuildCheckpoint) -> dict[str, Path]:
    return {family: shared_checkpoint(family, seed=7) for family in SERVED}


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (29, 6, 17)]


@pytest.mark.parametrize("family", SERVED)
def test_remote_shards_are_token_identical_to_transformers(
    family: str, checkpoints: dict[str, Path]
) -> None:
    """Experts split round-robin over three shards; each shard read only its own experts."""
    path = checkpoints[family]
    reader = CheckpointReader(path)
    spec = reader.spec
    shard_ids = ["s0", "s1", "s2"]
    table = round_robin(spec.moe_layers, spec.num_experts, shard_ids)
    pool = InProcessPool.start(str(path), {s: table.experts_on(s) for s in shard_ids})
    model = MoEModel(spec, load_backbone(reader), RemoteExperts(pool, table, "strong"))
    prompts = _prompts(seed=3)
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * len(prompts)
    ref = reference_model(path)
    for prompt, res in zip(prompts, generate(model, prompts, params), strict=True):
        assert res.token_ids == reference_greedy(ref, prompt, NEW_TOKENS)
    for sid in shard_ids:
        slots = table.experts_on(sid)
        expected = [n for layer, e in slots for n in expert_tensor_names(spec, layer, e)]
        assert sorted(pool.shards[sid].shard.reader.tensors_read) == sorted(expected)


class _RecordingOpen:
    """Wraps ``safe_open``: records whole-tensor reads and the row ranges of sliced reads."""

    reads: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, real: Any, *args: Any, **kwargs: Any) -> None:
        self._inner = real(*args, **kwargs)

    def __enter__(self) -> _RecordingOpen:
        self._handle = self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        self.reads.append((name, "all"))
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        inner, reads = self._handle.get_slice(name), self.reads

        class Slice:
            def get_shape(self) -> list[int]:
                return list(inner.get_shape())

            def get_dtype(self) -> str:
                return str(inner.get_dtype())

            def __getitem__(self, key: Any) -> torch.Tensor:
                reads.append((name, (key.start, key.stop)))
                return inner[key]

        return Slice()


def test_fused_expert_shards_read_only_their_slices(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-oss keeps each layer's experts in four [E, ...] tensors: a shard holding experts
    1 and 6 of layer 0 and 3 of layer 2 reads rows 1, 6 and 3 of them, nothing else."""
    import experts.checkpoint as ckpt

    real = ckpt.safe_open
    _RecordingOpen.reads = []
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: _RecordingOpen(real, *a, **k))
    slots = [(0, 1), (0, 6), (2, 3)]
    shard = ExpertShard(checkpoints["gpt_oss"], slots=slots)
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    expected = sorted(
        (f"model.layers.{layer}.mlp.experts.{n}", (e, e + 1)) for layer, e in slots for n in names
    )
    assert sorted(_RecordingOpen.reads) == expected
    assert shard.slots == slots


def test_fused_expert_shards_compute_what_the_colocated_model_does(
    checkpoints: dict[str, Path],
) -> None:
    """Two shards of gpt-oss experts (biases, clamped SwiGLU) against all experts in one."""
    path = checkpoints["gpt_oss"]
    spec = CheckpointReader(path).spec
    everything = ExpertShard(path, slots=[(0, e) for e in range(spec.num_experts)])
    halves = [
        ExpertShard(path, slots=[(0, e) for e in range(spec.num_experts) if e % 2 == p])
        for p in (0, 1)
    ]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, spec.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:2] for _ in range(9)])
    ids[:, 1] = ids[:, 0] ^ 1  # one even and one odd expert per token: one pair per shard
    weights = torch.softmax(torch.randn(9, 2, generator=gen), dim=-1)
    split = [torch.where(ids % 2 == p, ids, -1) for p in (0, 1)]  # the other shard's: padding
    partial = [halves[p].compute(0, hidden, split[p], weights * (split[p] >= 0)) for p in (0, 1)]
    torch.testing.assert_close(
        partial[0] + partial[1], everything.compute(0, hidden, ids, weights), atol=1e-6, rtol=0
    )


def _reference_choices(ref: Any, prompt: list[int], family: str) -> dict[int, set[int]]:
    """The reference gate's experts at the prompt's last position, per MoE layer."""
    chosen: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        gate = getattr(layer.mlp, "router" if family == "gpt_oss" else "gate", None)
        if gate is None or not hasattr(gate, "top_k"):  # a dense layer
            continue

        def record(_module: Any, _args: Any, out: Any, i: int = i) -> None:
            chosen[i] = set(out[-1][-1].tolist())  # indices, last token

        hooks.append(gate.register_forward_hook(record))
    try:
        with torch.inference_mode():
            ref(torch.tensor([prompt]))
    finally:
        for hook in hooks:
            hook.remove()
    return chosen


@pytest.mark.parametrize("family", SERVED)
def test_return_routing_is_the_reference_gates_choice(
    family: str, checkpoints: dict[str, Path]
) -> None:
    path = checkpoints[family]
    model = MoEModel.from_checkpoint(path)
    engine = LLMEngine(model, EngineConfig(num_blocks=16))
    engine.runner.count_routing = True
    prompt = _prompts(seed=5)[0]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(EngineRequest("r", prompt, params, return_routing=True))
    events = []
    while engine.has_unfinished():
        events.extend(engine.step())
    routing = events[0].routing  # produced at the prompt's last position
    assert routing is not None
    assert [layer for layer, _ in routing] == list(model.spec.moe_layers)
    expected = _reference_choices(reference_model(path), prompt, family)
    assert {layer: set(ids) for layer, ids in routing} == expected
    counts = engine.runner.take_routed_counts()  # placement's load: every routed pair, once
    assert {layer for layer, _ in counts} == set(model.spec.moe_layers)
    num_tokens = len(prompt) + 1  # the prompt, then the first generated token
    per_layer = num_tokens * model.spec.num_experts_per_tok
    assert sum(counts.values()) == per_layer * len(model.spec.moe_layers)
