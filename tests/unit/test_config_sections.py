"""Config sections that are the runtime's own frozen dataclasses: ``tiers[].engine``
(``EngineConfig``), ``policy.cascade`` (``CascadeConfig``) and ``policy.shadow``
(``ShadowConfig``). Their defaults and checks are written once, in the dataclass; these tests
check that the YAML edge still refuses the same values with the field's path, refuses
unknown keys, keeps secrets out of messages and bounds what a message quotes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.engine.config import EngineConfig
from deploy.config import TierConfig, load_config
from deploy.policy_config import PolicyConfig
from deploy.sections import MAX_MESSAGE_CHARS
from router.shadow import ShadowConfig
from router.tier_policy import CascadeConfig, TierPolicyConfig
from tests.unit.test_config import TWO_TIERS, problems, with_tier, write


def policy(**sections: Any) -> dict[str, Any]:
    return {"tiers": TWO_TIERS, "policy": sections}


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            with_tier(engine={"block_size": 2048}),
            "tiers.1.engine.block_size: block_size=2048 is out of range: allowed [1, 1024]",
        ),
        (
            with_tier(engine={"kv_cache_bytes": 0}),
            "tiers.1.engine.kv_cache_bytes: kv_cache_bytes=0 is out of range: allowed >= 1",
        ),
        (
            with_tier(engine={"num_blocks": 0}),
            "tiers.1.engine.num_blocks: num_blocks=0 is out of range: allowed >= 1",
        ),
        (
            with_tier(engine={"max_num_seqs": 0}),
            "tiers.1.engine.max_num_seqs: max_num_seqs=0 is out of range: allowed >= 1",
        ),
        (
            with_tier(engine={"max_num_batched_tokens": -1}),
            "tiers.1.engine.max_num_batched_tokens: max_num_batched_tokens=-1 is out of range",
        ),
        (
            with_tier(engine={"block_size": "big"}),
            "tiers.1.engine.block_size: Input should be a valid integer, unable to parse string "
            "as an integer (got 'big')",
        ),
        (with_tier(engine={"blok_size": 8}), "tiers.1.engine.blok_size: Extra inputs are not"),
        (with_tier(engine=[16]), "tiers.1.engine: Input should be a dictionary or an instance"),
        (
            policy(cascade={"probe_tokens": 0}),
            "policy.cascade.probe_tokens: cascade.probe_tokens=0 must be >= 1",
        ),
        (
            policy(cascade={"min_mean_logprob": 1.0}),
            "policy.cascade.min_mean_logprob: cascade.min_mean_logprob=1.0 must be a finite "
            "number <= 0",
        ),
        (
            policy(cascade={"min_mean_logprob": float("-inf")}),
            "policy.cascade.min_mean_logprob: Input should be a finite number (got -inf)",
        ),
        (
            policy(cascade={"to_tier": "fast"}),
            "policy.cascade.to_tier: cascade.to_tier='fast' must differ from "
            "cascade.from_tier='fast'",
        ),
        (
            policy(shadow={"enabled": True, "primary_tier": "strong"}),
            "policy.shadow.candidate_tier: shadow.candidate_tier='strong' must differ from "
            "shadow.primary_tier='strong'",
        ),
        (policy(shadow={"share": 2}), "policy.shadow.share: shadow.share=2.0 must be in [0, 1]"),
        (
            policy(shadow={"promote": True}),
            "policy.shadow.promote: shadow.promote=True needs shadow.enabled=True",
        ),
        (
            policy(shadow={"min_samples": 50, "window": 10}),
            "policy.shadow.window: shadow.window=10 must be >= shadow.min_samples=50",
        ),
        (
            policy(shadow={"max_divergence": float("nan")}),
            "policy.shadow.max_divergence: Input should be a finite number (got nan)",
        ),
        (policy(shadow={"windw": 10}), "policy.shadow.windw: Extra inputs are not permitted"),
    ],
)
def test_runtime_checks_name_the_field_path(tmp_path: Path, data: Any, line: str) -> None:
    found = problems(tmp_path, data)
    assert any(p.startswith(line) for p in found), found


def test_a_runtime_message_quotes_its_value_once(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, with_tier(engine={"block_size": 0}))
    assert line == "tiers.1.engine.block_size: block_size=0 is out of range: allowed [1, 1024]"


def test_a_runtime_message_never_echoes_a_long_value(tmp_path: Path) -> None:
    name = "x" * 10_000
    (line,) = problems(tmp_path, policy(cascade={"from_tier": name, "to_tier": name}))
    assert line.startswith("policy.cascade.to_tier: cascade.to_tier='xxx")
    assert line.endswith("...") and len(line) < MAX_MESSAGE_CHARS + 40


def test_secrets_in_runtime_sections_are_redacted(tmp_path: Path) -> None:
    found = problems(tmp_path, with_tier(engine={"api_key": "sk-misplaced-2"}))
    assert found == ("tiers.1.engine.api_key: Extra inputs are not permitted (got <redacted>)",)


def test_type_errors_in_a_runtime_section_are_all_listed(tmp_path: Path) -> None:
    found = problems(tmp_path, with_tier(engine={"block_size": "a", "max_num_seqs": "b"}))
    assert [p.split(":")[0] for p in found] == [
        "tiers.1.engine.block_size",
        "tiers.1.engine.max_num_seqs",
    ]


def test_yaml_defaults_are_the_dataclass_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS}))
    assert cfg.tiers[0].engine == EngineConfig()
    assert (cfg.policy.cascade, cfg.policy.shadow) == (CascadeConfig(), ShadowConfig())
    assert PolicyConfig() == PolicyConfig(cascade=CascadeConfig(), shadow=ShadowConfig())


def test_the_engine_section_is_the_engine_config(tmp_path: Path) -> None:
    engine = {"block_size": 8, "num_blocks": 100, "max_num_seqs": 4}
    tier = load_config(write(tmp_path, with_tier(engine=engine))).tiers[1]
    assert tier.to_engine_config() == EngineConfig(block_size=8, num_blocks=100, max_num_seqs=4)
    direct = TierConfig(name="t", model="m", engine=EngineConfig(block_size=8))
    assert direct.to_engine_config().block_size == 8
    assert dataclasses.asdict(direct.engine) == direct.model_dump()["engine"]


def test_policy_converts_to_the_frozen_dataclass(tmp_path: Path) -> None:
    sections = {
        "default_tier": "strong",
        "cascade": {"probe_tokens": 4, "min_mean_logprob": -1.0},
        "shadow": {"enabled": True, "share": 0.1, "promote": True, "min_samples": 5},
    }
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS, "policy": sections}))
    assert cfg.policy_config() == TierPolicyConfig(
        tiers=("fast", "strong"),
        default_tier="strong",
        cascade=CascadeConfig(probe_tokens=4, min_mean_logprob=-1.0),
        shadow=ShadowConfig(enabled=True, share=0.1, promote=True, min_samples=5),
    )
    assert PolicyConfig().to_policy_config(["fast", "strong"]).default_tier == "fast"
    with pytest.raises(ValueError, match="must name at least one tier"):
        PolicyConfig().to_policy_config([])


def test_policy_must_name_configured_tiers(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, policy(cascade={"to_tier": "huge"}))
    assert line.startswith(
        "policy: cascade.to_tier='huge' is not a tier; known tiers: ['fast', 'strong']"
    )
    (line,) = problems(tmp_path, policy(default_tier="huge"))
    assert line.startswith("policy: default_tier='huge' is not a tier")
    (line,) = problems(tmp_path, policy(shadow={"enabled": True, "candidate_tier": "big"}))
    assert line.startswith("policy: shadow.candidate_tier='big' is not a tier")


def test_one_tier_without_cascade_is_valid(tmp_path: Path) -> None:
    data = {"tiers": [{"name": "tiny", "model": "m"}], "policy": {"cascade": {"enabled": False}}}
    assert load_config(write(tmp_path, data)).policy_config().default_tier == "tiny"


def test_runtime_config_modules_import_neither_pydantic_nor_torch() -> None:
    """The dataclasses are the one definition; the runtime never needs the edge's pydantic."""
    modules = "router.tier_policy, router.shadow, cluster.engine.config, experts.sampling_params"
    found = "sorted({'pydantic', 'torch', 'deploy'} & set(sys.modules))"
    code = f"import sys, {modules}; print({found})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kv_store_section_defaults_off_and_names_the_field(tmp_path: Path) -> None:
    from cluster.kv_store.config import KVStoreConfig
    from deploy.config import ConfigError, parse_config

    tiers = [{"name": "fast", "model": "m"}, {"name": "strong", "model": "s"}]
    assert parse_config({"tiers": tiers}, tmp_path).kv_store == KVStoreConfig()
    on = parse_config({"tiers": tiers, "kv_store": {"enabled": True, "replication": 2}}, tmp_path)
    assert on.kv_store.enabled and on.kv_store.replication == 2
    with pytest.raises(ConfigError) as err:
        parse_config({"tiers": tiers, "kv_store": {"replication": 9}}, tmp_path)
    assert "kv_store.replication: replication=9 is out of range: allowed [1, 3]" in str(err.value)
    with pytest.raises(ConfigError, match=r"kv_store\.nope: Extra inputs are not permitted"):
        parse_config({"tiers": tiers, "kv_store": {"nope": 1}}, tmp_path)
