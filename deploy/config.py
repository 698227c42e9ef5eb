"""The cluster's YAML config: one pydantic schema at the edge, converted to frozen dataclasses.

``load_config`` reads YAML (refusing duplicate keys), validates it against
:class:`ClusterConfig` with the file's directory as the base for relative paths, and turns
every pydantic error into a line ``field.path: message (got value)``; all of them are raised
together as one :class:`ConfigError` naming the file. Cross-field rules are field validators
on the later field, so their errors carry that field's path. API keys never appear in reprs,
dumps or error messages.

Each setting is defined once. Sections the runtime also reads are its frozen dataclasses
(``tiers[].engine`` is :class:`cluster.engine.config.EngineConfig`; ``policy.cascade`` and
``policy.shadow`` are the router's), holding their own defaults and checks; the others are
pydantic sections of the edge. :mod:`deploy.sections` says how the two meet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic import ValidationInfo as Info
from pydantic_core import ErrorDetails

from cluster.engine.config import EngineConfig  # torch-free, like everything imported here
from cluster.kv_store.config import KVStoreConfig
from cluster.telemetry.settings import TelemetrySettings
from deploy.api import DEFAULT_MAX_TOKENS_LIMIT
from deploy.audit import AuditSettings
from deploy.edge_config import AuthConfig, GrpcConfig
from deploy.expert_config import ExpertsSettings
from deploy.policy_config import PolicyConfig
from deploy.sections import RUNTIME_CHECK, Section, runtime_section

if TYPE_CHECKING:
    from router.tier_policy import TierPolicyConfig

DEFAULT_DEMO_DIR = Path(".demo-models")
_TIER_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class ConfigError(ValueError):
    """An unusable config: every problem found, one per line, with the file it came from."""

    def __init__(self, path: Path | None, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = tuple(problems)
        where = f"config file {path}" if path is not None else "config"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid {where} ({len(self.problems)} problem(s)):\n{lines}")


def _resolve_path(value: str, info: Info) -> str:
    """Expand ``~``; make a relative path absolute against the loading file's directory."""
    value = os.path.expanduser(value)
    base = (info.context or {}).get("base_dir")
    if base is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base, value))


class TierConfig(Section):
    """One model tier: its checkpoint, replicas, resources and engine limits."""

    name: str
    model: str = Field(min_length=1)  # checkpoint dir; relative = against the config file's dir
    replicas: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=0.5, ge=0)
    device: str = Field(default="cpu", validate_default=True)
    max_queued_requests: int = Field(default=64, ge=1)
    # a request that waited longer than this for a replica (in the queue above) is refused
    # with RESOURCE_EXHAUSTED when it reaches one, instead of being served late; None: never
    max_queue_wait_s: float | None = Field(default=None, gt=0, le=3600)
    max_ongoing_requests: int = Field(default=32, ge=1)
    engine: Annotated[EngineConfig, runtime_section(EngineConfig)] = EngineConfig()
    experts: ExpertsSettings = ExpertsSettings()
    max_tokens_limit: int = Field(default=DEFAULT_MAX_TOKENS_LIMIT, ge=1)
    # tokens gathered per streamed item after the first (which goes out at once): each item
    # costs a Ray streaming hop (replica -> gateway) and a gRPC message; 1 = every token
    stream_interval: int = Field(default=1, ge=1, le=256)
    # under load, items grow so that a replica streams about this many items per engine step
    # across all its requests (an item per request per step would cost more CPU than the
    # step at high concurrency); 0 = always stream_interval
    stream_items_per_step: int = Field(default=2, ge=0, le=4096)
    # torch intra-op threads in each replica; None: Ray's OMP_NUM_THREADS (the replica's
    # num_cpus rounded up, at least 1). Set it for CPU serving with more than one core.
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    # the engine in a child process of each replica, away from the replica's Python threads
    # (they share a GIL with an in-process engine); None: yes unless the experts are sharded
    # on the ray data plane, whose per-layer actor calls only a Ray worker can make
    engine_process: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _TIER_NAME.fullmatch(name):
            raise ValueError("tier names are 1 to 32 characters of a-z, 0-9, '_' and '-'")
        return name

    @field_validator("model")
    @classmethod
    def _model_path(cls, model: str, info: Info) -> str:
        return _resolve_path(model, info)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str, info: Info) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N'")
        num_gpus = info.data.get("num_gpus", 0.0)
        if device == "cpu" and num_gpus > 0:
            raise ValueError(
                f"num_gpus={num_gpus} reserves GPUs but device 'cpu' would not use them; "
                "set device: cuda, or num_gpus: 0 to run on CPU"
            )
        return device

    @field_validator("engine_process")
    @classmethod
    def _engine_process(cls, engine_process: bool | None, info: Info) -> bool | None:
        experts = info.data.get("experts")
        if engine_process and experts is not None and experts.needs_ray_per_layer:
            raise ValueError(
                "engine_process: true cannot use experts.data_plane 'ray' (an actor call per "
                "layer needs the engine in the replica's Ray worker); set data_plane: "
                "torch_dist, or leave engine_process unset"
            )
        return engine_process

    @property
    def runs_engine_process(self) -> bool:
        """Unset: yes, sharded tiers included (the engine process joins the shards' data-plane
        channels itself, and is kept from the replica's GIL like any other); only a sharded
        tier on the ``ray`` data plane keeps its engine in the replica."""
        if self.engine_process is not None:
            return self.engine_process
        return not self.experts.needs_ray_per_layer

    def to_engine_config(self) -> EngineConfig:
        return self.engine

    @property
    def model_name(self) -> str:
        """The checkpoint directory's name: what clients see (never the absolute path)."""
        return os.path.basename(os.path.normpath(self.model)) or self.name


class TelemetryConfig(Section):
    """OpenTelemetry traces and metrics, set up in every process of the cluster.

    The standard ``OTEL_*`` environment variables (``OTEL_TRACES_EXPORTER``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ...)
    override these values where they are set, in each process. Defaults are
    :class:`TelemetrySettings`' own; the bounds here are the file's (stricter than the
    runtime's where they differ, e.g. no port 0).
    """

    service_name: str = Field(default=TelemetrySettings.service_name, min_length=1)
    traces_exporter: Literal["none", "console", "otlp", "file"] = "none"
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317
    file_path: str | None = Field(default=None, validate_default=True)
    sample_ratio: float = Field(default=TelemetrySettings.sample_ratio, ge=0, le=1)
    metrics_exporter: Literal["none", "prometheus", "otlp"] = "none"
    prometheus_port: int = Field(default=TelemetrySettings.prometheus_port, ge=1, le=65535)
    # 0.0.0.0: every interface
    prometheus_host: str = Field(default=TelemetrySettings.prometheus_host, min_length=1)
    record_text: bool = False  # put prompt/completion text on spans (off: may hold user data)
    # per-token events per request
    token_events: int = Field(default=TelemetrySettings.token_events, ge=0, le=1_000_000)
    # expert-dispatch spans (one per MoE layer call, each with its shards' spans) per request:
    # the first steps of each traced request; 0 = none
    dispatch_spans: int = Field(default=TelemetrySettings.dispatch_spans, ge=0, le=1_000_000)
    resource_attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("file_path")
    @classmethod
    def _path(cls, path: str | None, info: Info) -> str | None:
        if info.data.get("traces_exporter") == "file" and not path:
            raise ValueError("traces_exporter 'file' needs file_path: a JSON-lines file")
        return _resolve_path(path, info) if path else path

    def settings(self) -> TelemetrySettings:
        """The runtime's settings: every field here is one of theirs, attributes as pairs."""
        fields = self.model_dump()
        fields["resource_attributes"] = tuple(sorted(self.resource_attributes.items()))
        return TelemetrySettings(**fields)


class AuditConfig(AuditSettings):
    """``audit.path`` resolves against the config file's directory, like other paths."""

    @field_validator("path")
    @classmethod
    def _audit_path(cls, path: str, info: Info) -> str:
        return _resolve_path(path, info)


class RayConfig(Section):
    address: str | None = None  # None: start or join a local Ray instance
    num_cpus: float | None = Field(default=None, gt=0)
    namespace: str = Field(default="moe-cluster", min_length=1)


class ClusterConfig(Section):
    """The whole cluster: gRPC edge, auth, tiers, tier policy, the cluster KV store, telemetry,
    audit and Ray."""

    grpc: GrpcConfig = GrpcConfig()
    auth: AuthConfig = AuthConfig()
    tiers: tuple[TierConfig, ...]
    policy: PolicyConfig = Field(default=PolicyConfig(), validate_default=True)
    # one store for every tier (block keys carry the model): off by default
    kv_store: Annotated[KVStoreConfig, runtime_section(KVStoreConfig)] = KVStoreConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    audit: AuditConfig = AuditConfig()
    ray: RayConfig = RayConfig()

    @field_validator("tiers")
    @classmethod
    def _unique_names(cls, tiers: tuple[TierConfig, ...]) -> tuple[TierConfig, ...]:
        if not tiers:
            raise ValueError("list at least one tier, each with a name and a model")
        names = [t.name for t in tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {dupes}")
        return tiers

    @field_validator("policy")
    @classmethod
    def _known_tiers(cls, policy: PolicyConfig, info: Info) -> PolicyConfig:
        tiers = info.data.get("tiers")
        if tiers is None:  # tiers already failed and reported their own error
            return policy
        try:
            policy.to_policy_config([t.name for t in tiers])
        except ValueError as exc:
            raise ValueError(
                f"{exc} (name a tier listed under tiers, or set that section's enabled: false)"
            ) from None
        return policy

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"unknown tier {name!r}; known tiers: {list(self.tier_names)}")

    def policy_config(self) -> TierPolicyConfig:
        return self.policy.to_policy_config(self.tier_names)

    def serving_on(self, port: int) -> ClusterConfig:
        """The same cluster with its gRPC front door on ``port`` (tests and benchmarks)."""
        return self.model_copy(update={"grpc": self.grpc.model_copy(update={"port": port})})


def largest_context(config: ClusterConfig) -> int | None:
    """The longest context (``max_position_embeddings``) among the tiers' checkpoints that
    this process can read (the gateway may run on a node without them): a bound for a
    request's prompt tokens. None when none can be read."""
    contexts = []
    for tier in config.tiers:
        try:
            with open(os.path.join(tier.model, "config.json"), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
        context = text.get("max_position_embeddings") if isinstance(text, dict) else None
        if isinstance(context, int) and context > 0:
            contexts.append(context)
    return max(contexts, default=None)


def format_error(err: ErrorDetails) -> str:
    """``loc.path: message (got value)``; the value is left out when it is a whole section,
    or when a runtime dataclass's check (see :mod:`deploy.sections`) already quotes it."""
    loc = ".".join(str(part) for part in err["loc"]) or "<top level>"
    msg = err["msg"].removeprefix("Value error, ")
    if _may_hold_a_secret(err["loc"]):
        return f"{loc}: {msg} (got <redacted>)"
    value = err.get("input")
    if err["type"] in ("missing", RUNTIME_CHECK):  # nothing given, or quoted by the message
        return f"{loc}: {msg}"
    if isinstance(value, Mapping | list | tuple | BaseModel) or dataclasses.is_dataclass(value):
        return f"{loc}: {msg}"
    shown = repr(value)
    return f"{loc}: {msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


_SECRET_NAME = re.compile(
    r"(^|_)(api_?)?(keys?|secrets?|passw(or)?ds?|credentials?|bearer)($|_)", re.I
)


def _may_hold_a_secret(loc: tuple[int | str, ...]) -> bool:
    """Anything under ``auth``, or a field named like a secret anywhere (a key put in the
    wrong place is still a key): its value never reaches an error message."""
    return bool(loc) and (loc[0] == "auth" or any(_SECRET_NAME.search(str(p)) for p in loc))


def parse_config(
    data: Mapping[str, Any], base_dir: Path, source: Path | None = None
) -> ClusterConfig:
    """Validate a mapping; relative paths resolve against ``base_dir``."""
    context = {"base_dir": os.path.abspath(base_dir)}
    try:
        return ClusterConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, [format_error(e) for e in exc.errors()]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def default_config(demo_dir: Path = DEFAULT_DEMO_DIR) -> ClusterConfig:
    """The demo cluster: ``fast`` (dense) cascading to ``strong`` (tiny MoE) on 127.0.0.1:9000."""
    tiers = [
        {"name": "fast", "model": str(demo_dir / "fast")},
        {"name": "strong", "model": str(demo_dir / "tiny")},
    ]
    return parse_config({"tiers": tiers}, base_dir=Path.cwd())


def load_config(path: str | Path | None, demo_dir: Path = DEFAULT_DEMO_DIR) -> ClusterConfig:
    """Read and validate a YAML config; ``None`` gives :func:`default_config` of ``demo_dir``."""
    if path is None:
        return default_config(demo_dir)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            path,
            [
                "<top level>: expected a mapping of sections (grpc, auth, tiers, policy, "
                f"kv_store, telemetry, audit, ray) (got {type(data).__name__}: {data!r:.60})"
            ],
        )
    return parse_config(data, base_dir=path.parent, source=path)
