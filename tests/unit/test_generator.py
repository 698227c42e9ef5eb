"""The minimal generation loop and the model runner: stopping, validation, reproducibility."""

from __future__ import annotations

import pytest
import torch

from cache.kv_pool import KVPool
from cluster.engine.generator import generate
from cluster.engine.model_runner import ModelRunner, StepInput
from experts.model import MoEModel
from experts.sampling_params import SamplingParams
from tests.checkpoints import build_family_checkpoint

PROMPT = [5, 17, 42, 99, 3, 8, 250, 11, 64, 7, 33, 21, 90, 180, 4, 6, 77, 12, 9, 101]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MoEModel:
    path = build_family_checkpoint("mixtral", tmp_path_factory.mktemp("gen") / "m", seed=2)
    return MoEModel.from_checkpoint(path)


def _greedy(model: MoEModel, n: int = 20, **kw: object) -> list[int]:
    params = SamplingParams(max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return generate(model, [PROMPT], [params])[0].token_ids


def test_stop_token_ends_generation(model: MoEModel) -> None:
    free = _greedy(model)
    stop = free[5]
    first = free.index(stop)
    res = generate(model, [PROMPT], [SamplingParams(max_tokens=20, stop_token_ids=(stop,))])[0]
    assert res.token_ids == free[: first + 1] and res.finish_reason == "stop"


def test_eos_stops_unless_ignored(model: MoEModel) -> None:
    free = _greedy(model)
    eos = free[3]
    spec = model.spec
    object.__setattr__(spec, "eos_token_ids", (eos,))  # a frozen spec, patched for this test
    try:
        stopped = generate(model, [PROMPT], [SamplingParams(max_tokens=20)])[0]
        ignored = generate(model, [PROMPT], [SamplingParams(max_tokens=20, ignore_eos=True)])[0]
    finally:
        object.__setattr__(spec, "eos_token_ids", (2,))
    assert stopped.token_ids == free[: free.index(eos) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == free and ignored.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 99999], SamplingParams(), "outside the vocabulary"),
        ([1] * 500, SamplingParams(max_tokens=100), "exceeds the model's context of 512"),
    ],
)
def test_bad_prompts_are_refused(
    model: MoEModel, prompt: list[int], params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate(model, [prompt], [params])


def test_seeded_sampling_does_not_depend_on_the_batch(model: MoEModel) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    alone = generate(model, [PROMPT], [sampled])[0].token_ids
    other = SamplingParams(max_tokens=30, temperature=0.8, seed=9, ignore_eos=True)
    together = generate(model, [PROMPT[:7], PROMPT], [other, sampled])[1].token_ids
    assert alone == together
    reseeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=124, ignore_eos=True)
    assert generate(model, [PROMPT], [reseeded])[0].token_ids != alone


def test_chunked_prefill_equals_one_shot(model: MoEModel) -> None:
    """Prefill in uneven chunks over the paged cache gives the one-shot logits."""
    spec = model.spec
    pool = KVPool(spec.num_layers, 8, 4, spec.num_kv_heads, spec.head_dim)
    runner = ModelRunner(model, pool)
    one_shot = runner.run([StepInput(PROMPT, [7, 2, 5, 0, 3], 0, 0)])
    table = [1, 6, 4, 3, 0]
    done = 0
    for size in (3, 9, 1, 7):
        chunk = PROMPT[done : done + size]
        logits = runner.run([StepInput(chunk, table, done, done)])
        done += size
    assert done == len(PROMPT)
    torch.testing.assert_close(logits, one_shot, atol=1e-5, rtol=0)


def test_runner_batches_prefill_and_decode_together(model: MoEModel) -> None:
    spec = model.spec
    pool = KVPool(spec.num_layers, 16, 4, spec.num_kv_heads, spec.head_dim)
    runner = ModelRunner(model, pool)
    a_table, b_table = [0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]
    runner.run([StepInput(PROMPT[:19], a_table, 0, 0)])
    mixed = runner.run([StepInput(PROMPT[19:], a_table, 19, 19), StepInput(PROMPT, b_table, 0, 0)])
    torch.testing.assert_close(mixed[0], mixed[1], atol=1e-5, rtol=0)
