"""The cluster config schema: defaults, error lines (field path + bad value), paths, conversions.

Configs are written to ``tmp_path`` as YAML and loaded with ``load_config``, the way the CLI and
the Serve app read them, so every error is checked in the exact form an operator sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.engine.config import EngineConfig
from deploy.config import (
    AuthConfig,
    ClusterConfig,
    ConfigError,
    default_config,
    largest_context,
    load_config,
    parse_config,
)
from deploy.policy_config import PolicyConfig

REPO = Path(__file__).resolve().parents[2]
TWO_TIERS: list[dict[str, Any]] = [
    {"name": "fast", "model": "m/fast"},
    {"name": "strong", "model": "m/tiny"},
]


def write(tmp_path: Path, data: Any, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def problems(tmp_path: Path, data: Any) -> tuple[str, ...]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value.problems


def with_tier(**fields: Any) -> dict[str, Any]:
    return {"tiers": [TWO_TIERS[0], {**TWO_TIERS[1], **fields}]}


# --- defaults -----------------------------------------------------------------------------------


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS}))
    assert (cfg.grpc.host, cfg.grpc.port) == ("127.0.0.1", 9000)
    assert (cfg.auth.api_keys, cfg.auth.api_keys_env) == ((), "MOE_CLUSTER_API_KEYS")
    tier = cfg.tier("fast")
    assert (tier.replicas, tier.num_gpus, tier.num_cpus, tier.device) == (1, 0.0, 0.5, "cpu")
    assert (tier.max_queued_requests, tier.max_ongoing_requests, tier.max_tokens_limit) == (
        64,
        32,
        4096,
    )
    assert tier.engine == EngineConfig()
    assert cfg.policy == PolicyConfig()
    assert cfg.telemetry.traces_exporter == "none"
    assert (cfg.telemetry.service_name, cfg.telemetry.sample_ratio) == ("moe-cluster", 1.0)
    assert (cfg.ray.address, cfg.ray.num_cpus, cfg.ray.namespace) == (None, None, "moe-cluster")
    assert cfg.tier_names == ("fast", "strong")


def test_default_config_is_the_demo_cluster(tmp_path: Path) -> None:
    cfg = default_config(tmp_path / "demo")
    assert cfg.tier_names == ("fast", "strong")
    assert cfg.tier("fast").model == str(tmp_path / "demo" / "fast")
    assert cfg.tier("strong").model == str(tmp_path / "demo" / "tiny")
    assert (cfg.grpc.host, cfg.grpc.port) == ("127.0.0.1", 9000)
    policy = cfg.policy_config()
    assert (policy.cascade.enabled, policy.cascade.from_tier, policy.cascade.to_tier) == (
        True,
        "fast",
        "strong",
    )
    assert load_config(None, demo_dir=tmp_path / "demo") == cfg


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS}))
    with pytest.raises(ValueError, match="frozen"):
        cfg.grpc.port = 1


def test_unknown_tier_lookup_lists_known() -> None:
    with pytest.raises(KeyError, match=r"known tiers: \['fast', 'strong'\]"):
        default_config().tier("huge")


# --- error lines: field path + bad value --------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            with_tier(replicas=0),
            "tiers.1.replicas: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            with_tier(replicas="two"),
            "tiers.1.replicas: Input should be a valid integer, unable to parse string as an "
            "integer (got 'two')",
        ),
        (
            with_tier(num_gpus=-1),
            "tiers.1.num_gpus: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            with_tier(device="tpu"),
            "tiers.1.device: device must be 'cpu', 'cuda' or 'cuda:N' (got 'tpu')",
        ),
        (
            with_tier(name="Strong!"),
            "tiers.1.name: tier names are 1 to 32 characters of a-z, 0-9, '_' and '-' "
            "(got 'Strong!')",
        ),
        (with_tier(name="x" * 33), "tiers.1.name: tier names are 1 to 32 characters"),
        (with_tier(model=""), "tiers.1.model: String should have at least 1 character (got '')"),
        (
            with_tier(max_queued_requests=0),
            "tiers.1.max_queued_requests: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            with_tier(max_ongoing_requests=0),
            "tiers.1.max_ongoing_requests: Input should be greater than or equal to 1 (got 0)",
        ),
        (with_tier(enigne={}), "tiers.1.enigne: Extra inputs are not permitted"),
        (
            {"tiers": TWO_TIERS, "grpc": {"port": 70000}},
            "grpc.port: Input should be less than or equal to 65535 (got 70000)",
        ),
        (
            {"tiers": TWO_TIERS, "grpc": {"port": 0}},
            "grpc.port: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"tiers": TWO_TIERS, "grcp": {}}, "grcp: Extra inputs are not permitted"),
        (
            {"tiers": TWO_TIERS, "telemetry": {"traces_exporter": "zipkin"}},
            "telemetry.traces_exporter: Input should be 'none', 'console', 'otlp' or 'file' "
            "(got 'zipkin')",
        ),
        (
            {"tiers": TWO_TIERS, "telemetry": {"sample_ratio": 1.5}},
            "telemetry.sample_ratio: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            {"tiers": TWO_TIERS, "ray": {"num_cpus": 0}},
            "ray.num_cpus: Input should be greater than 0 (got 0)",
        ),
    ],
)
def test_each_error_names_the_field_path_and_quotes_the_value(
    tmp_path: Path, data: dict[str, Any], line: str
) -> None:
    found = problems(tmp_path, data)
    assert any(p.startswith(line) for p in found), found


def test_gpus_on_a_cpu_device_explains_the_mismatch(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, with_tier(num_gpus=1))
    assert line == (
        "tiers.1.device: num_gpus=1.0 reserves GPUs but device 'cpu' would not use them; "
        "set device: cuda, or num_gpus: 0 to run on CPU (got 'cpu')"
    )
    assert load_config(write(tmp_path, with_tier(num_gpus=0.5, device="cuda:1"))).tiers[1].device


def test_engine_process_by_default_unless_sharded_over_ray(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, with_tier()))
    assert cfg.tiers[1].engine_process is None and cfg.tiers[1].runs_engine_process
    sharded = {"placement": "sharded"}  # torch_dist: the engine process joins the channels
    assert load_config(write(tmp_path, with_tier(experts=sharded))).tiers[1].runs_engine_process
    over_ray = {"placement": "sharded", "data_plane": "ray"}
    cfg = load_config(write(tmp_path, with_tier(experts=over_ray)))
    assert not cfg.tiers[1].runs_engine_process
    cfg = load_config(write(tmp_path, with_tier(engine_process=False)))
    assert not cfg.tiers[1].runs_engine_process
    (line,) = problems(tmp_path, with_tier(experts=over_ray, engine_process=True))
    assert line.startswith(
        "tiers.1.engine_process: engine_process: true cannot use experts.data_plane 'ray'"
    ), line


def test_all_problems_are_listed_together(tmp_path: Path) -> None:
    found = problems(tmp_path, {**with_tier(replicas=0, device="tpu"), "grpc": {"port": 0}})
    assert len(found) == 3, found


def test_missing_and_empty_tiers(tmp_path: Path) -> None:
    assert problems(tmp_path, {"grpc": {}}) == ("tiers: Field required",)
    assert problems(tmp_path, {"tiers": []})[0].startswith("tiers: list at least one tier")


def test_duplicate_tier_names(tmp_path: Path) -> None:
    tiers = [TWO_TIERS[0], {"name": "fast", "model": "x"}]
    assert problems(tmp_path, {"tiers": tiers}) == (
        "tiers: tier names must be unique; repeated: ['fast']",
    )


def test_telemetry_file_exporter_needs_its_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, {"tiers": TWO_TIERS, "telemetry": {"traces_exporter": "file"}})
    assert line.startswith("telemetry.file_path: traces_exporter 'file' needs file_path")
    ok = {"traces_exporter": "file", "file_path": "traces/spans.jsonl", "sample_ratio": 0.5}
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS, "telemetry": ok}))
    assert cfg.telemetry.file_path == str(tmp_path / "traces" / "spans.jsonl")
    settings = cfg.telemetry.settings()  # what every process sets up from
    assert settings.traces_exporter == "file" and settings.sample_ratio == 0.5
    assert settings.file_path == cfg.telemetry.file_path


def test_otlp_endpoint_may_come_from_the_environment(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, {"tiers": TWO_TIERS, "telemetry": {"traces_exporter": "otlp"}})
    )
    assert cfg.telemetry.settings().otlp_endpoint is None  # OTEL_EXPORTER_OTLP_ENDPOINT decides


def test_audit_path_resolves_against_the_config_file(tmp_path: Path) -> None:
    audit = {"enabled": True, "path": "logs/audit.jsonl"}
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS, "audit": audit}))
    assert cfg.audit.path == str(tmp_path / "logs" / "audit.jsonl")
    assert cfg.audit.record_text is False


# --- the file itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "expected a mapping of sections"),
        ("just a string\n", "expected a mapping of sections"),
        ("", "(got NoneType: None)"),
        ("tiers: [\n", "not valid YAML"),
        ("grpc: {}\ngrpc: {}\n", "duplicate key 'grpc'"),
    ],
)
def test_unusable_files(tmp_path: Path, text: str, expected: str) -> None:
    (line,) = problems(tmp_path, text)
    assert expected in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml.*\n  cannot read the file"):
        load_config(tmp_path / "nope.yaml")


def test_relative_model_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    data: dict[str, Any] = {
        "tiers": [{"name": "a", "model": "../models/a"}, {"name": "b", "model": "/abs/b"}],
        "policy": {"cascade": {"enabled": False}},
    }
    cfg = load_config(write(tmp_path / "conf", data))
    assert cfg.tier("a").model == str(tmp_path / "models" / "a")
    assert cfg.tier("b").model == "/abs/b"


def test_relative_config_path_still_gives_absolute_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, {"tiers": TWO_TIERS})
    monkeypatch.chdir(tmp_path)
    assert load_config("cluster.yaml").tier("fast").model == str(tmp_path / "m" / "fast")


def test_cluster_yaml_loads() -> None:
    cfg = load_config(REPO / "deploy" / "cluster.yaml")
    assert cfg.tier_names == ("fast", "strong")
    assert cfg.tier("fast").model == str(REPO / ".demo-models" / "fast")
    assert cfg.tier("strong").model == str(REPO / ".demo-models" / "tiny")
    assert cfg.policy_config() == default_config(REPO / ".demo-models").policy_config()


# --- auth ---------------------------------------------------------------------------------------


def test_api_keys_from_file_and_env() -> None:
    auth = AuthConfig.model_validate({"api_keys": ["k1"], "api_keys_env": "KEYS"})
    assert auth.resolve_api_keys({"KEYS": " k2, ,k3 ,k1"}) == {"k1", "k2", "k3"}
    assert auth.resolve_api_keys({}) == {"k1"}
    assert AuthConfig().resolve_api_keys({}) == frozenset()  # no keys anywhere: no auth
    no_env = AuthConfig(api_keys_env=None)
    assert no_env.resolve_api_keys({"MOE_CLUSTER_API_KEYS": "k"}) == frozenset()


def test_api_keys_default_to_the_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CLUSTER_API_KEYS", "from-env")
    assert AuthConfig().resolve_api_keys() == {"from-env"}


def test_api_keys_never_show(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"tiers": TWO_TIERS, "auth": {"api_keys": ["s3cret"]}}))
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())
    for bad in ([" "], ["s3cret", 12345]):
        found = problems(tmp_path, {"tiers": TWO_TIERS, "auth": {"api_keys": bad}})
        assert all("<redacted>" in p and "12345" not in p for p in found), found
    (line,) = problems(tmp_path, {"tiers": TWO_TIERS, "auth": {"api_keys_env": "BAD-NAME"}})
    assert line.startswith("auth.api_keys_env: must be an environment variable name")


@pytest.mark.parametrize(
    "data",
    [
        {"auth": {"api_key": "sk-misplaced-1"}},  # a typo of api_keys
        {"grpc": {"api_keys": ["sk-misplaced-1"]}},  # the right name in the wrong section
        {"telemetry": {"otlp_secret": "sk-misplaced-1"}},
        {"auth": {"allow_unauthenticated": "sk-misplaced-1"}},
    ],
)
def test_misplaced_secrets_are_redacted_in_errors(tmp_path: Path, data: dict[str, Any]) -> None:
    found = problems(tmp_path, {"tiers": TWO_TIERS, **data})
    assert found and all("sk-misplaced-1" not in p for p in found), found
    assert any("<redacted>" in p for p in found), found


# --- helpers ----------------------------------------------------------------------------------


def test_parse_config_without_a_file() -> None:
    with pytest.raises(ConfigError, match=r"invalid config \(1 problem\(s\)\)"):
        parse_config({"tiers": []}, base_dir=Path("."))
    assert isinstance(parse_config({"tiers": TWO_TIERS}, base_dir=Path("/x")), ClusterConfig)


def test_largest_context_reads_the_checkpoints_it_can(tmp_path: Path) -> None:
    for name, context in (("a", 512), ("b", 4096)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"max_position_embeddings": {context}}}')
    tiers = [{"name": n, "model": n} for n in ("a", "b", "missing")]
    data = {"tiers": tiers, "policy": {"cascade": {"enabled": False}}}
    assert largest_context(parse_config(data, base_dir=tmp_path)) == 4096
    assert largest_context(parse_config({**data, "tiers": tiers[2:]}, base_dir=tmp_path)) is None


def test_max_queue_wait_s_is_off_by_default_and_positive(tmp_path: Path) -> None:
    tier = {"name": "fast", "model": "m"}
    data = {"tiers": [tier], "policy": {"cascade": {"enabled": False}}}
    assert parse_config(data, base_dir=tmp_path).tiers[0].max_queue_wait_s is None
    set_ = {**data, "tiers": [{**tier, "max_queue_wait_s": 0.5}]}
    assert parse_config(set_, base_dir=tmp_path).tiers[0].max_queue_wait_s == 0.5
    (line,) = problems(tmp_path, {**data, "tiers": [{**tier, "max_queue_wait_s": 0}]})
    assert line.startswith("tiers.0.max_queue_wait_s: Input should be greater than 0")
