"""The cluster's edge: where the gRPC front door listens, its limits, TLS and API keys.

Safe by default: the front door binds 127.0.0.1; a gateway that would listen on any other
address with no API key refuses to start unless ``auth.allow_unauthenticated`` says so.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping

from pydantic import Field, SecretStr, field_validator

from deploy.sections import Section

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_API_KEY_BYTES = 512


class TlsConfig(Section):
    """PEM files of the front door's certificate chain and key; ``client_ca_file`` turns on
    mutual TLS (clients must present a certificate signed by it)."""

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    client_ca_file: str | None = None


class GrpcConfig(Section):
    # the address the gateway's gRPC server binds on its node; 0.0.0.0 or :: for all interfaces
    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    port: int = Field(default=9000, ge=1, le=65535)
    # RPCs one gateway replica serves at once; beyond it a call is refused at once with
    # RESOURCE_EXHAUSTED (the gateway's queue is the tiers' bounded queues, not its own)
    max_concurrent_streams: int = Field(default=1024, ge=1, le=1_000_000)
    gateway_replicas: int = Field(default=1, ge=1)
    # largest request message accepted; beyond it the call fails with RESOURCE_EXHAUSTED
    max_message_bytes: int = Field(default=4 * 2**20, ge=1024, le=256 * 2**20)
    # a Generate call is ended with DEADLINE_EXCEEDED after this long, whatever the client's
    # own deadline (the shorter of the two applies)
    request_timeout_s: float = Field(default=600.0, gt=0, le=86_400)
    # HTTP/2 keepalive pings to idle clients, to find dead connections; and how long to wait
    keepalive_time_s: float = Field(default=60.0, ge=1, le=86_400)
    keepalive_timeout_s: float = Field(default=20.0, ge=1, le=3600)
    # a request whose tier replica is lost (actor died, engine stopped) is resubmitted to
    # another replica of its tier, with the tokens already sent, at most this many times
    # (and only before its deadline); 0: never
    max_resubmissions: int = Field(default=2, ge=0, le=10)
    tls: TlsConfig | None = None  # None: plaintext (put TLS in front, or set this)

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 literals bracketed)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class AuthConfig(Section):
    """API keys from the file plus a comma-separated environment variable, read where the
    gateway runs. No key on a non-loopback address refuses to start unless
    ``allow_unauthenticated``."""

    api_keys: tuple[SecretStr, ...] = ()
    api_keys_env: str | None = "MOE_CLUSTER_API_KEYS"
    allow_unauthenticated: bool = False

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        blank = [i for i, k in enumerate(keys) if not k.get_secret_value().strip()]
        if blank:
            raise ValueError(f"api keys at positions {blank} are blank")
        long = [i for i, k in enumerate(keys) if len(k.get_secret_value()) > MAX_API_KEY_BYTES]
        if long:
            raise ValueError(f"api keys at positions {long} are over {MAX_API_KEY_BYTES} bytes")
        return keys

    @field_validator("api_keys_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError("must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        return name

    def resolve_api_keys(self, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """The accepted keys: the file's plus the env var's (read now from ``environ``)."""
        env = os.environ if environ is None else environ
        keys = {k.get_secret_value().strip() for k in self.api_keys}
        if self.api_keys_env is not None:
            keys.update(k.strip() for k in env.get(self.api_keys_env, "").split(","))
        keys.discard("")
        return frozenset(keys)


class ExposureError(RuntimeError):
    """The front door would listen beyond this machine with nobody checking who calls."""


def check_exposure(grpc: GrpcConfig, auth: AuthConfig, keys: frozenset[str]) -> str:
    """Refuse an unauthenticated non-loopback front door unless allowed; return a line saying
    the auth state, for the start-up log."""
    if keys:
        return f"auth on: {len(keys)} API key(s); gRPC on {grpc.address}"
    if grpc.loopback_only:
        return f"auth off (no API key); gRPC on {grpc.address}, reachable from this machine only"
    if auth.allow_unauthenticated:
        return (
            f"auth OFF on a non-loopback address ({grpc.address}): anyone who reaches it can "
            "generate (auth.allow_unauthenticated is true)"
        )
    env = f" or the {auth.api_keys_env} environment variable" if auth.api_keys_env else ""
    raise ExposureError(
        f"refusing to serve gRPC on {grpc.address} without authentication: no API key in "
        f"auth.api_keys{env} where the gateway runs. Set a key (in the gateway's environment: "
        "the driver's is not seen by a gateway on another node), bind grpc.host to 127.0.0.1, "
        "or set auth.allow_unauthenticated: true"
    )


def tenant_of(key: str) -> str:
    """A stable id for the holder of an API key (never the key itself): it salts the prefix
    cache, so tenants never share or time each other's cached blocks."""
    return hashlib.blake2b(key.encode(), digest_size=12, person=b"moe-tenant").hexdigest()
