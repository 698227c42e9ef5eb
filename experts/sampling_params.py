"""Per-request sampling settings (torch-free: the gateway builds them at the edge)."""

from __future__ import annotations

from dataclasses import dataclass

# Below this temperature sampling is greedy (argmax). At T = 1e-5 a logit gap g leaves the
# lower token a weight of exp(-g / T), under exp(-100) for any gap above 1e-3: a lower
# temperature changes nothing but the handling of near-exact ties, while dividing by one is
# what broke (below ~3e-39, 1 / T overflows fp32; 5e-324 even rounds to 0 in fp32).
GREEDY_TEMPERATURE_FLOOR = 1e-5
DEFAULT_MAX_TOKENS = 64  # what a request that sets no max_tokens gets (at most its tier's limit)
MAX_TOKENS = 1_000_000  # the hard bound; each tier's max_tokens_limit is usually far lower
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000  # beyond any vocabulary; top_k >= vocab is simply "off"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; invalid values raise ``ValueError`` naming the field.

    The one definition of these bounds and defaults: the gRPC edge builds one from each
    request and reports its error as INVALID_ARGUMENT.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # below GREEDY_TEMPERATURE_FLOOR (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (
                "max_tokens",
                self.max_tokens,
                1 <= self.max_tokens <= MAX_TOKENS,
                f"[1, {MAX_TOKENS}]",
            ),
            (
                "temperature",
                self.temperature,
                0.0 <= self.temperature <= MAX_TEMPERATURE,
                f"[0, {MAX_TEMPERATURE:g}]",
            ),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "(0, 1]"),
            ("top_k", self.top_k, 0 <= self.top_k <= MAX_TOP_K, f"[0, {MAX_TOP_K}] (0 = off)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range: allowed {allowed}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} is out of range: allowed [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_FLOOR
