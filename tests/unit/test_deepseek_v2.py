"""DeepSeek-V2 against transformers, the correctness oracle.

Its softmax gate (``greedy`` and ``group_limited_greedy``) against transformers' router over
several group settings; then every variant of ``tests.checkpoints.V2_FAMILIES`` (q LoRA or a
full-rank q as in V2-Lite, YaRN, interleaved rotary pairs): prefill logits within 1e-4 (MLA
absorbed and expanded), greedy tokens identical through paged decode and continuous
batching, a small token budget (chunked prefill), remote expert shards, and the routing a
request asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from cache.kv_pool import KVPool
from cluster.engine.config import EngineConfig
from cluster.engine.generator import generate
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.requests import EngineRequest
from cluster.expert_parallel.expert_pool import InProcessPool
from cluster.expert_parallel.remote_experts import RemoteExperts
from experts.attention import AttentionBatch, SequenceChunk
from experts.checkpoint import CheckpointReader
from experts.gate import route_grouped_softmax
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from experts.weights import expert_tensor_names, load_backbone
from router.routing_table import round_robin
from tests.checkpoints import V2_FAMILIES, BuildCheckpoint, build_family_checkpoint
from tests.reference import reference_greedy, reference_model

BLOCK = 16
PROMPT_LENS = (37, 5, 20, 16)  # longer than a block, shorter, ragged, exactly one block
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(shared_checkpoint: BuildCheckpoint) -> dict[str, Path]:
    return {family: shared_checkpoint(family, seed=7) for family in V2_FAMILIES}


def _prompts(vocab: int, seed: int, lens: tuple[int, ...] = PROMPT_LENS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


# (experts, top_k, topk_method, n_group, topk_group): fewer groups kept than experts chosen
# (else the top k always lie in the best groups), one group kept, exactly the kept groups'
# experts chosen (DeepSeek-V2's 8 groups, 3 kept, top-6, scaled down), and greedy
GATE_SETTINGS = [
    (16, 3, "group_limited_greedy", 4, 2),
    (16, 4, "group_limited_greedy", 4, 1),
    (16, 6, "group_limited_greedy", 8, 3),
    (12, 4, "group_limited_greedy", 6, 2),
    (8, 2, "greedy", None, None),
]


@pytest.mark.parametrize(("experts", "top_k", "method", "n_group", "topk_group"), GATE_SETTINGS)
def test_gate_matches_the_reference_router(
    experts: int, top_k: int, method: str, n_group: int | None, topk_group: int | None
) -> None:
    cfg = transformers.DeepseekV2Config(
        hidden_size=32,
        num_attention_heads=4,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=16.0,
    )
    router = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(cfg)
    gen = torch.Generator().manual_seed(experts + top_k)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, 32, generator=gen))
    hidden = torch.randn(64, 32, generator=gen)
    with torch.inference_mode():
        _, expected_w, expected_ids = router(hidden)
    ids, weights = route_grouped_softmax(
        hidden, router.weight.detach(), top_k, n_group or 1, topk_group or 1, 16.0
    )
    if method == "group_limited_greedy":  # the setting limits some token's choice
        greedy = torch.topk(F.linear(hidden, router.weight.detach()), top_k, dim=-1)[1]
        assert not torch.equal(greedy.sort(-1)[0], ids.sort(-1)[0])
    order, expected_order = ids.argsort(-1), expected_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), expected_ids.gather(1, expected_order))
    torch.testing.assert_close(
        weights.gather(1, order), expected_w.gather(1, expected_order), atol=1e-6, rtol=0
    )


def test_router_is_kept_in_fp32_in_a_bf16_checkpoint(tmp_path: Path) -> None:
    """Like the reference (``_keep_in_fp32_modules_strict``), the gate reads fp32 weights."""
    path = build_family_checkpoint("deepseek_v2_lite", tmp_path / "m", dtype="bfloat16")
    reader = CheckpointReader(path)
    layers = load_backbone(reader).layers
    assert reader.spec.dtype == "bfloat16" and layers[0].router is None  # a dense layer
    for i in reader.spec.moe_layers:
        router = layers[i].router
        assert router is not None and router.dtype == torch.float32
        assert layers[i].input_norm.dtype == torch.bfloat16


def _prefill_logits(model: MoEModel, prompts: list[list[int]]) -> torch.Tensor:  # [T, V]
    free = list(range(31, -1, -2)) + list(range(30, -1, -2))  # scattered block tables
    chunks = [
        SequenceChunk([free.pop() for _ in range(-(-len(p) // BLOCK))], 0, len(p), 0)
        for p in prompts
    ]
    batch = AttentionBatch.build(chunks, BLOCK, model.device)
    planes, heads, dim = model.spec.kv_cache_shape
    pool = KVPool(model.spec.num_layers, 32, BLOCK, heads, dim, num_planes=planes)
    with torch.inference_mode():
        return model.logits(
            model.forward(torch.tensor([t for p in prompts for t in p]), batch, pool)
        )


PREFILL_CASES = [(f, None) for f in V2_FAMILIES] + [
    (f, absorb) for f in ("deepseek_v2", "deepseek_v2_lite") for absorb in (True, False)
]


@pytest.mark.parametrize(("family", "absorb"), PREFILL_CASES)
def test_prefill_logits_match_transformers(
    family: str, absorb: bool | None, checkpoints: dict[str, Path]
) -> None:
    model = MoEModel.from_checkpoint(checkpoints[family])
    assert model.spec.family.name == "deepseek_v2" and model.spec.rope_interleave
    model.mla_absorb = absorb
    prompts = _prompts(model.spec.vocab_size, seed=0)
    ours = _prefill_logits(model, prompts)
    ref = reference_model(checkpoints[family])
    offset = 0
    with torch.inference_mode():
        for p in prompts:
            expected = ref(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[offset : offset + len(p)], expected, atol=1e-4, rtol=0)
            offset += len(p)


@pytest.mark.parametrize("family", V2_FAMILIES)
def test_greedy_generation_is_token_identical(family: str, checkpoints: dict[str, Path]) -> None:
    """All prompts at once through ``generate``: paged decode, continuous batching."""
    model = MoEModel.from_checkpoint(checkpoints[family])
    prompts = _prompts(model.spec.vocab_size, seed=1)
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)] * len(prompts)
    ref = reference_model(checkpoints[family])
    for prompt, res in zip(prompts, generate(model, prompts, params), strict=True):
        assert res.token_ids == reference_greedy(ref, prompt, NEW_TOKENS)


def test_chunked_prefill_in_a_small_token_budget_is_token_identical(
    checkpoints: dict[str, Path],
) -> None:
    """12 tokens a step: prompts arrive in chunks over their cached latents, beside decodes."""
    path = checkpoints["deepseek_v2_lite"]
    model = MoEModel.from_checkpoint(path)
    prompts = _prompts(model.spec.vocab_size, seed=2)
    engine = LLMEngine(
        model, EngineConfig(block_size=BLOCK, num_blocks=32, max_num_batched_tokens=12)
    )
    for i, prompt in enumerate(prompts):
        engine.add_request(
            EngineRequest(str(i), prompt, SamplingParams(max_tokens=10, ignore_eos=True))
        )
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for event in engine.step():
            got[int(event.request_id)].append(event.token_id)
    ref = reference_model(path)
    for i, prompt in enumerate(prompts):
        assert got[i] == reference_greedy(ref, prompt, 10), f"prompt {i}"


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v2_lite"])
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
    prompts = _prompts(spec.vocab_size, seed=3, lens=(29, 6, 17))
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * len(prompts)
    ref = reference_model(path)
    for prompt, res in zip(prompts, generate(model, prompts, params), strict=True):
        assert res.token_ids == reference_greedy(ref, prompt, 10)
    for sid in shard_ids:
        expected = [
            n for layer, e in table.experts_on(sid) for n in expert_tensor_names(spec, layer, e)
        ]
        assert sorted(pool.shards[sid].shard.reader.tensors_read) == sorted(expected)


def _reference_choices(ref: Any, prompt: list[int]) -> dict[int, set[int]]:
    """The reference gate's experts at the prompt's last position, per MoE layer."""
    chosen: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        gate = getattr(layer.mlp, "gate", None)
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


def test_return_routing_is_the_reference_gates_choice(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["deepseek_v2"]
    model = MoEModel.from_checkpoint(path)
    engine = LLMEngine(model, EngineConfig(num_blocks=16))
    prompt = _prompts(model.spec.vocab_size, seed=5, lens=(29,))[0]
    engine.add_request(
        EngineRequest(
            "r", prompt, SamplingParams(max_tokens=2, ignore_eos=True), return_routing=True
        )
    )
    events = []
    while engine.has_unfinished():
        events.extend(engine.step())
    routing = events[0].routing  # produced at the prompt's last position
    assert routing is not None
    assert [layer for layer, _ in routing] == list(model.spec.moe_layers) == [1, 2]
    expected = _reference_choices(reference_model(path), prompt)
    assert {layer: set(ids) for layer, ids in routing} == expected
