"""Sampling parameters, seeded reproducibility, the filters, and numerical safety: every
accepted temperature, and rows that cannot be sampled failing alone."""

from __future__ import annotations

import math

import pytest
import torch

from experts.sampling import NON_FINITE_LOGITS, Sampler, sample_batch
from experts.sampling_params import GREEDY_TEMPERATURE_FLOOR, SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, "[1, 1000000]"),
        ("temperature", -0.5, "[0, 100]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -1, "[0, 1000000] (0 = off)"),
        ("top_k", 1_000_001, "[0, 1000000] (0 = off)"),
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
    sampled = sample_batch(logits, [Sampler(SamplingParams()) for _ in range(3)])
    assert sampled.tokens == logits.argmax(-1).tolist() and not sampled.failed
    expected = torch.log_softmax(logits, -1).max(-1).values
    torch.testing.assert_close(torch.tensor(sampled.logprobs), expected)


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


# (top_k, top_p); 10**6 is the largest top_k allowed, far beyond the vocabulary
FILTERS = [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (3, 0.9), (10**6, 1e-300)]


def _extreme_logits() -> torch.Tensor:
    """Rows a tiny temperature used to overflow: ordinary, near fp32's largest, with -inf."""
    logits = _logits(3, vocab=40, seed=7)
    logits[1] *= 1e37  # |logits| up to ~1e38: logits / 1e-5 was inf
    logits[2, ::2] = float("-inf")  # masked tokens: never drawn
    return logits


@pytest.mark.parametrize(
    "temperature", [1e-38, 1e-45, 5e-324, math.nextafter(GREEDY_TEMPERATURE_FLOOR, 0.0)]
)
@pytest.mark.parametrize(("top_k", "top_p"), FILTERS)
def test_temperatures_below_the_floor_are_greedy(
    temperature: float, top_k: int, top_p: float
) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    assert params.greedy
    logits = _extreme_logits()
    sampled = sample_batch(logits, [Sampler(params) for _ in range(3)])
    assert sampled.tokens == logits.argmax(-1).tolist() and not sampled.failed
    assert all(math.isfinite(lp) for lp in sampled.logprobs)
    sampler = Sampler(params)
    assert [sampler.pick(row) for row in logits] == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "temperature",
    [GREEDY_TEMPERATURE_FLOOR, math.nextafter(GREEDY_TEMPERATURE_FLOOR, 1.0), 1e-3, 100.0],
)
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (2, 1.0), (5, 0.9)])
def test_temperatures_from_the_floor_up_sample_safely_and_reproducibly(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Two tokens tied at a huge logit, the rest far below or masked: only the two are
    drawn, each sometimes, and a seed gives the same draws again."""
    logits = _logits(vocab=40, seed=9)[0] * 1e37
    logits[[4, 11]] = 3e38
    logits[::3] = float("-inf")  # tokens 4 and 11 are not among them
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=21)
    assert not params.greedy

    def draw() -> list[int]:
        sampler = Sampler(params)
        return [sampler.pick(logits) for _ in range(40)]

    first = draw()
    assert first == draw()
    if temperature < 1.0:  # the rest, ~1e37 below, weigh nothing even at 100
        assert set(first) == {4, 11}
    sampled = sample_batch(logits[None].repeat(2, 1), [Sampler(params), Sampler(params)])
    assert not sampled.failed and sampled.tokens[0] == sampled.tokens[1] == first[0]


def test_rows_that_cannot_be_sampled_fail_alone() -> None:
    logits = _logits(6, vocab=30, seed=12)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[4, 0] = float("nan")
    params = [
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(),  # greedy: argmax would pick the NaN
        SamplingParams(temperature=1.0, top_k=3, seed=6),
        SamplingParams(temperature=0.7, top_p=0.5, seed=7),
        SamplingParams(temperature=1e-45),
        SamplingParams(temperature=1.2, top_k=4, top_p=0.9, seed=8),
    ]
    sampled = sample_batch(logits, [Sampler(p) for p in params])
    assert sampled.failed == dict.fromkeys((1, 2, 3, 4), NON_FINITE_LOGITS)
    assert [sampled.tokens[r] for r in (1, 2, 3, 4)] == [-1] * 4
    assert all(math.isnan(sampled.logprobs[r]) for r in (1, 2, 3, 4))
    good = [0, 5]
    alone = sample_batch(logits[good], [Sampler(params[r]) for r in good])
    assert [sampled.tokens[r] for r in good] == alone.tokens
    assert [sampled.logprobs[r] for r in good] == pytest.approx(alone.logprobs)


def test_an_all_greedy_batch_fails_its_bad_rows_alone() -> None:
    """The all-greedy path (one device-to-host copy) fails and reports rows as the mixed one."""
    logits = _logits(4, vocab=30, seed=13)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    sampled = sample_batch(logits, [Sampler(SamplingParams()) for _ in range(4)])
    assert sampled.failed == dict.fromkeys((1, 2), NON_FINITE_LOGITS)
    assert sampled.tokens[1:3] == [-1, -1]
    assert all(math.isnan(sampled.logprobs[r]) for r in (1, 2))
    for r in (0, 3):
        assert sampled.tokens[r] == int(logits[r].argmax())
        expected = float(torch.log_softmax(logits[r], -1)[sampled.tokens[r]])
        assert sampled.logprobs[r] == pytest.approx(expected)


class _BrokenSampler(Sampler):
    def pick(self, logits: torch.Tensor) -> int:
        raise RuntimeError("broken " + "x" * 10_000)


def test_a_sampler_that_raises_fails_its_row_alone() -> None:
    logits = _logits(3, seed=13)
    params = SamplingParams(temperature=0.9, seed=1)
    samplers = [Sampler(params), _BrokenSampler(params), Sampler(params)]
    sampled = sample_batch(logits, samplers)
    assert list(sampled.failed) == [1] and sampled.tokens[1] == -1
    reason = sampled.failed[1]
    assert reason.startswith("sampling raised RuntimeError: broken") and len(reason) <= 200
    alone = sample_batch(logits[[0, 2]], [Sampler(params), Sampler(params)])
    assert [sampled.tokens[0], sampled.tokens[2]] == alone.tokens


def test_the_greedy_floor() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE_FLOOR).greedy
