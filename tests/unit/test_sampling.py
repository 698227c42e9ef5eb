"""Sampling parameters, seeded reproducibility and the filters."""

from __future__ import annotations

import pytest
import torch

from experts.sampling import Sampler, SamplingParams, sample_batch


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, "[1, 1000000]"),
        ("temperature", -0.5, "[0, 100]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("seed", -3, "[0, 2**63)"),
    ],
)
def test_bad_params_name_field_value_and_range(field: str, value: float, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert f"{field}={value!r}" in str(info.value) and allowed in str(info.value)


def _logits(rows: int = 1, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_takes_argmax_and_reports_logprob() -> None:
    logits = _logits(3)
    tokens, logprobs = sample_batch(logits, [Sampler(SamplingParams()) for _ in range(3)])
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values
    torch.testing.assert_close(torch.tensor(logprobs), expected)


def test_seed_reproduces_and_differs() -> None:
    logits = _logits()[0]

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.pick(logits) for _ in range(30)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(4, seed=2)
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=1),
        SamplingParams(temperature=1.5, top_p=1e-6, seed=1),
    ):
        sampler = Sampler(params)
        assert [sampler.pick(row) for row in logits] == logits.argmax(-1).tolist()


def test_top_k_and_top_p_only_draw_from_kept_tokens() -> None:
    logits = _logits(vocab=20, seed=3)[0]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=0))
    drawn = {sampler.pick(logits) for _ in range(300)}
    assert drawn <= top3 and len(drawn) > 1

    logits = logits / 4  # flatter, so the nucleus holds several tokens
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
    assert 1 < len(nucleus) < 20
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    drawn = {sampler.pick(logits) for _ in range(300)}
    assert drawn <= nucleus and len(drawn) > 1


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    counts = torch.bincount(torch.tensor([sampler.pick(logits) for _ in range(4000)]), minlength=3)
    torch.testing.assert_close(counts / 4000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)
