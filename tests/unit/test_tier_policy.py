"""Tier policy without a model: explicit tiers, cascade escalation, shadow sampling and promotion.

Every figure is hand-made: logprob probes, token sequences and request ids. Shadow sampling is
a stable hash of the id, so the share checks below give the same counts on every run.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from router.shadow import ShadowConfig, ShadowResult, ShadowTracker, divergence, stable_unit_hash
from router.tier_policy import (
    REASONS,
    CascadeConfig,
    TierDecision,
    TierPolicy,
    TierPolicyConfig,
)

TIERS = ("fast", "strong")


def make_policy(
    cascade: CascadeConfig | None = None,
    shadow: ShadowConfig | None = None,
    default_tier: str = "fast",
) -> TierPolicy:
    return TierPolicy(
        TierPolicyConfig(
            tiers=TIERS,
            default_tier=default_tier,
            cascade=cascade or CascadeConfig(),
            shadow=shadow or ShadowConfig(),
        )
    )


def promoting(**overrides: object) -> ShadowConfig:
    fields: dict[str, object] = {
        "enabled": True,
        "share": 0.5,
        "promote": True,
        "min_samples": 3,
        "max_divergence": 0.25,
        "window": 5,
    }
    fields.update(overrides)
    return ShadowConfig(**fields)  # type: ignore[arg-type]


def result(div: float, gap: float = 0.0) -> ShadowResult:
    return ShadowResult(token_agreement=1.0 - div, logprob_gap=gap, divergence=div)


# --- choose -------------------------------------------------------------------------------------


def test_explicit_tier_wins_over_everything() -> None:
    policy = make_policy()
    d = policy.choose("strong", retrieval_confidence=0.0)
    assert d == TierDecision("strong", "explicit", None, False, 0)
    assert policy.choose("fast", None).reason == "explicit"


def test_unknown_explicit_tier_lists_known_tiers() -> None:
    with pytest.raises(ValueError, match=r"unknown tier 'huge'; known tiers: \['fast', 'strong'\]"):
        make_policy().choose("huge", None)


def test_low_retrieval_confidence_goes_straight_to_strong() -> None:
    d = make_policy().choose(None, retrieval_confidence=0.2)
    assert d == TierDecision("strong", "low_retrieval_confidence", 0.2, True, 0)


def test_retrieval_confidence_at_the_bar_is_not_low() -> None:
    d = make_policy().choose(None, retrieval_confidence=0.5)
    assert d.reason == "cascade_pending"


def test_cascade_starts_on_fast_with_a_probe() -> None:
    d = make_policy(CascadeConfig(probe_tokens=5)).choose(None, retrieval_confidence=None)
    assert d == TierDecision("fast", "cascade_pending", None, False, 5)


def test_cascade_pending_carries_the_retrieval_confidence_it_passed() -> None:
    d = make_policy().choose(None, retrieval_confidence=0.9)
    assert (d.tier, d.confidence, d.probe_tokens) == ("fast", 0.9, 8)


def test_no_cascade_gives_the_default_tier_and_ignores_retrieval() -> None:
    policy = make_policy(CascadeConfig(enabled=False), default_tier="strong")
    assert policy.choose(None, retrieval_confidence=0.0) == TierDecision("strong", "default")


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_retrieval_confidence_out_of_range_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match=r"retrieval_confidence=.* must be in \[0, 1\]"):
        make_policy().choose(None, retrieval_confidence=bad)


# --- after_probe --------------------------------------------------------------------------------


def test_low_mean_logprob_escalates() -> None:
    policy = make_policy()
    pending = policy.choose(None, None)
    d = policy.after_probe(pending, [-3.0, -2.0, -4.0])
    assert d == TierDecision("strong", "low_confidence", -3.0, True, 0)


def test_confident_probe_stays_on_fast() -> None:
    policy = make_policy()
    d = policy.after_probe(policy.choose(None, None), [-0.5, -1.5])
    assert d == TierDecision("fast", "confident", -1.0, False, 0)


def test_mean_exactly_at_the_bar_is_confident() -> None:
    policy = make_policy()
    assert policy.after_probe(policy.choose(None, None), [-2.5, -2.5]).reason == "confident"


def test_only_the_first_k_logprobs_count() -> None:
    policy = make_policy(CascadeConfig(probe_tokens=2))
    pending = policy.choose(None, None)
    # First two average -1.0; the tail would drag the mean far below the bar.
    d = policy.after_probe(pending, [-1.0, -1.0, -50.0, -50.0])
    assert (d.reason, d.confidence) == ("confident", -1.0)


def test_early_end_uses_the_tokens_there_are() -> None:
    policy = make_policy(CascadeConfig(probe_tokens=8))
    d = policy.after_probe(policy.choose(None, None), [-4.0])
    assert (d.tier, d.reason, d.confidence) == ("strong", "low_confidence", -4.0)


def test_empty_probe_is_confident() -> None:
    policy = make_policy()
    d = policy.after_probe(policy.choose(None, None), [])
    assert d == TierDecision("fast", "confident", None, False, 0)


def test_minus_infinity_logprob_escalates() -> None:
    policy = make_policy()
    assert policy.after_probe(policy.choose(None, None), [-math.inf]).tier == "strong"


def test_nan_logprob_is_rejected() -> None:
    policy = make_policy()
    with pytest.raises(ValueError, match="NaN"):
        policy.after_probe(policy.choose(None, None), [-1.0, math.nan])


def test_after_probe_needs_a_pending_decision() -> None:
    policy = make_policy()
    with pytest.raises(
        ValueError, match=r"needs a 'cascade_pending' decision, got reason='explicit'"
    ):
        policy.after_probe(policy.choose("fast", None), [-1.0])


# --- counters -----------------------------------------------------------------------------------


def test_counters_track_reasons_and_escalations() -> None:
    policy = make_policy()
    policy.choose("strong", None)  # explicit
    policy.choose(None, 0.1)  # low_retrieval_confidence (escalated)
    policy.after_probe(policy.choose(None, None), [-9.0])  # pending, low_confidence (escalated)
    policy.after_probe(policy.choose(None, None), [-0.1])  # pending, confident
    assert policy.num_escalations == 2
    assert policy.num_decisions == 4  # cascade_pending is not a settled decision
    assert dict(policy.num_by_reason) == {
        "explicit": 1,
        "low_retrieval_confidence": 1,
        "cascade_pending": 2,
        "low_confidence": 1,
        "confident": 1,
    }
    assert set(policy.num_by_reason) <= set(REASONS)


def test_unknown_reason_is_an_invariant_violation() -> None:
    with pytest.raises(AssertionError, match="reason='bogus'"):
        TierDecision("fast", "bogus")


# --- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe_tokens": 0}, r"cascade.probe_tokens=0 must be >= 1"),
        ({"min_mean_logprob": 0.5}, r"cascade.min_mean_logprob=0.5 must be a finite number <= 0"),
        ({"min_mean_logprob": -math.inf}, r"cascade.min_mean_logprob=-inf must be a finite"),
        ({"min_retrieval_confidence": 1.2}, r"min_retrieval_confidence=1.2 must be in \[0, 1\]"),
        ({"to_tier": "fast"}, r"cascade.to_tier='fast' must differ from cascade.from_tier='fast'"),
    ],
)
def test_cascade_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CascadeConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"share": 1.5}, r"shadow.share=1.5 must be in \[0, 1\]"),
        ({"share": math.nan}, r"shadow.share=nan must be in \[0, 1\]"),
        ({"probe_tokens": 0}, r"shadow.probe_tokens=0 must be >= 1"),
        ({"max_divergence": -0.1}, r"shadow.max_divergence=-0.1 must be in \[0, 1\]"),
        ({"min_samples": 0}, r"shadow.min_samples=0 must be >= 1"),
        ({"window": 10}, r"shadow.window=10 must be >= shadow.min_samples=20"),
        ({"promote": True}, r"shadow.promote=True needs shadow.enabled=True"),
        ({"enabled": True, "candidate_tier": "fast"}, r"candidate_tier='fast' must differ"),
    ],
)
def test_shadow_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowConfig(**kwargs)  # type: ignore[arg-type]


def test_policy_config_checks_every_tier_name() -> None:
    with pytest.raises(ValueError, match=r"tiers=\(\) must name at least one tier"):
        TierPolicyConfig(tiers=(), default_tier="fast")
    with pytest.raises(ValueError, match=r"repeats \['fast'\]"):
        TierPolicyConfig(tiers=("fast", "fast"), default_tier="fast")
    with pytest.raises(ValueError, match=r"default_tier='huge' is not a tier; known tiers"):
        TierPolicyConfig(tiers=TIERS, default_tier="huge")
    with pytest.raises(ValueError, match=r"cascade.to_tier='huge' is not a tier"):
        TierPolicyConfig(TIERS, "fast", cascade=CascadeConfig(to_tier="huge"))
    with pytest.raises(ValueError, match=r"shadow.candidate_tier='huge' is not a tier"):
        TierPolicyConfig(TIERS, "fast", shadow=ShadowConfig(enabled=True, candidate_tier="huge"))


def test_disabled_sections_may_name_absent_tiers() -> None:
    cfg = TierPolicyConfig(tiers=("tiny",), default_tier="tiny", cascade=CascadeConfig(False))
    assert TierPolicy(cfg).choose(None, None) == TierDecision("tiny", "default")


# --- shadow sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5, 0.9])
def test_shadow_share_holds_over_many_ids(share: float) -> None:
    tracker = ShadowTracker(ShadowConfig(enabled=True, share=share))
    n = 10_000
    hits = sum(tracker.should_shadow(f"req-{i}") for i in range(n))
    assert abs(hits / n - share) < 0.02  # binomial sd at n=10k is <= 0.005


def test_shadow_sampling_is_deterministic_and_edge_shares() -> None:
    ids = [f"req-{i}" for i in range(500)]
    a = ShadowTracker(ShadowConfig(enabled=True, share=0.3))
    b = ShadowTracker(ShadowConfig(enabled=True, share=0.3))
    assert [a.should_shadow(i) for i in ids] == [b.should_shadow(i) for i in ids]
    everyone = ShadowTracker(ShadowConfig(enabled=True, share=1.0))
    assert all(everyone.should_shadow(i) for i in ids)
    assert not any(
        ShadowTracker(ShadowConfig(enabled=True, share=0.0)).should_shadow(i) for i in ids
    )
    assert not any(
        ShadowTracker(ShadowConfig(enabled=False, share=1.0)).should_shadow(i) for i in ids
    )


def test_stable_hash_is_the_same_in_another_process() -> None:
    code = "from router.shadow import stable_unit_hash; print(repr(stable_unit_hash('req-42')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == stable_unit_hash("req-42")
    assert 0.0 <= stable_unit_hash("") < 1.0


def test_policy_shadows_only_settled_primary_requests() -> None:
    policy = make_policy(shadow=ShadowConfig(enabled=True, share=1.0))
    pending = policy.choose(None, None)
    assert policy.shadow_tier(pending, "r1") is None  # not settled yet
    assert policy.shadow_tier(policy.after_probe(pending, [-0.1]), "r1") == "strong"
    assert policy.shadow_tier(policy.choose("strong", None), "r1") is None


# --- divergence maths ---------------------------------------------------------------------------


def test_identical_runs_do_not_diverge() -> None:
    r = divergence([1, 2, 3], [-1.0, -2.0, -3.0], [1, 2, 3], [-1.0, -2.0, -3.0], k=3)
    assert r == ShadowResult(token_agreement=1.0, logprob_gap=0.0, divergence=0.0)


def test_divergence_counts_mismatches_over_the_first_k() -> None:
    # positions 0..3 compared: 1=1, 2!=9, 3=3, 4!=8 -> 2/4 agree; position 4 is beyond k
    r = divergence([1, 2, 3, 4, 5], [-1.0] * 5, [1, 9, 3, 8, 0], [-2.0, -2.0, -2.0, -2.0, -99.0], 4)
    assert r.token_agreement == pytest.approx(0.5)
    assert r.divergence == pytest.approx(0.5)
    assert r.logprob_gap == pytest.approx(1.0)  # |-1 - (-2)|; the -99 is past k


def test_positions_beyond_the_shorter_run_disagree() -> None:
    r = divergence([1, 2, 3, 4], [-0.5] * 4, [1, 2], [-1.5, -0.5], k=8)
    assert r.token_agreement == pytest.approx(2 / 4)
    assert r.logprob_gap == pytest.approx(abs(-0.5 - (-1.0)))


def test_two_equal_short_runs_agree_fully() -> None:
    assert divergence([7, 8], [-1.0, -1.0], [7, 8], [-1.0, -1.0], k=16).divergence == 0.0


def test_empty_runs() -> None:
    assert divergence([], [], [], [], k=4) == ShadowResult(1.0, 0.0, 0.0)
    one_sided = divergence([1, 2], [-1.0, -1.0], [], [], k=4)
    assert (one_sided.token_agreement, one_sided.logprob_gap) == (0.0, 0.0)


def test_divergence_needs_positive_k() -> None:
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        divergence([1], [-1.0], [1], [-1.0], k=0)


def test_tracker_divergence_defaults_k_to_probe_tokens() -> None:
    tracker = ShadowTracker(ShadowConfig(probe_tokens=2))
    assert tracker.divergence([1, 2, 3], [], [1, 2, 9], []).token_agreement == 1.0
    assert tracker.divergence([1, 2, 3], [], [1, 2, 9], [], k=3).token_agreement == pytest.approx(
        2 / 3
    )


# --- rolling window and promotion ---------------------------------------------------------------


def test_rolling_window_is_bounded() -> None:
    tracker = ShadowTracker(ShadowConfig(window=200))
    for i in range(450):
        tracker.record(result(1.0 if i < 250 else 0.0, gap=0.5))
    assert tracker.num_samples == 200
    assert tracker.num_recorded == 450
    assert tracker.mean_divergence == 0.0  # the 250 divergent ones fell out of the window
    assert tracker.mean_logprob_gap == pytest.approx(0.5)


def test_empty_window_means_are_zero() -> None:
    tracker = ShadowTracker(ShadowConfig())
    assert (tracker.num_samples, tracker.mean_divergence, tracker.mean_logprob_gap) == (0, 0.0, 0.0)


def test_promotion_state_none_without_promote() -> None:
    policy = make_policy(shadow=ShadowConfig(enabled=True, share=0.5))
    assert policy.promotion_state() == "none"
    assert policy.promotion_held_reason() is None


def test_promotion_held_until_min_samples_then_active() -> None:
    policy = make_policy(shadow=promoting())
    assert policy.promotion_state() == "held"
    assert policy.promotion_held_reason() == "num_samples=0 < min_samples=3"
    assert policy.choose(None, None).reason == "cascade_pending"
    for _ in range(3):
        policy.shadow.record(result(0.1))
    assert policy.promotion_state() == "active"
    assert policy.promotion_held_reason() is None
    assert policy.choose(None, None) == TierDecision("strong", "promoted")


def test_promotion_held_while_divergence_is_high_and_falls_back() -> None:
    policy = make_policy(shadow=promoting())
    for _ in range(3):
        policy.shadow.record(result(0.5))
    assert policy.promotion_state() == "held"
    assert policy.promotion_held_reason() == "mean_divergence=0.5000 > max_divergence=0.25"
    for _ in range(5):  # the window (5) now holds only agreeing samples
        policy.shadow.record(result(0.0))
    assert policy.promotion_state() == "active"
    for _ in range(2):  # mean over the last 5: (0+0+0+1+1)/5 = 0.4
        policy.shadow.record(result(1.0))
    assert policy.promotion_state() == "held"


def test_divergence_exactly_at_the_limit_is_active() -> None:
    policy = make_policy(shadow=promoting())
    for _ in range(4):
        policy.shadow.record(result(0.25))
    assert policy.promotion_state() == "active"


def test_promotion_replaces_the_default_tier_without_cascade() -> None:
    policy = make_policy(CascadeConfig(enabled=False), shadow=promoting())
    assert policy.choose(None, None) == TierDecision("fast", "default")
    for _ in range(3):
        policy.shadow.record(result(0.0))
    assert policy.choose(None, None) == TierDecision("strong", "promoted")


def test_promotion_yields_to_explicit_and_low_retrieval() -> None:
    policy = make_policy(shadow=promoting())
    for _ in range(3):
        policy.shadow.record(result(0.0))
    assert policy.choose("fast", None).reason == "explicit"
    assert policy.choose(None, 0.1).reason == "low_retrieval_confidence"
    assert policy.choose(None, 0.9).reason == "promoted"


def test_promotion_of_another_tier_leaves_the_start_alone() -> None:
    # Shadowing 'strong' with 'fast' promotes fast over strong; the cascade starts on fast anyway.
    policy = make_policy(shadow=promoting(primary_tier="strong", candidate_tier="fast"))
    for _ in range(3):
        policy.shadow.record(result(0.0))
    assert policy.promotion_state() == "active"
    assert policy.choose(None, None).reason == "cascade_pending"
