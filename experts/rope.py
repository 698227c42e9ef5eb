"""Rotary settings of a checkpoint: the base, how many dims rotate, and YaRN scaling.

Parsed from ``config.json`` in both layouts transformers writes: 4.x keeps ``rope_theta``,
``partial_rotary_factor`` and ``rope_scaling`` at the top level, 5.x nests them under
``rope_parameters``. Only the default rope and YaRN are computed; any other rope type is
refused naming the field.

YaRN (https://arxiv.org/abs/2309.00071) blends each frequency between its extrapolated
value (``1 / theta^(2i/d)``) and the interpolated one (divided by ``factor``), with a linear
ramp over the dims whose wavelength falls between ``beta_fast`` and ``beta_slow``
rotations of the original context; the rotated dims are scaled by ``attention_factor``
(cos and sin are multiplied by it). DeepSeek's MLA also multiplies the softmax scale by
``mscale(factor, mscale_all_dim)^2``, the non-rotary dims included (``softmax_scale``).
The formulas follow transformers' ``_compute_yarn_parameters`` and ``yarn_apply_mscale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from experts.errors import CheckpointError

if TYPE_CHECKING:  # torch only where tables are built: the spec stays torch-free
    import torch

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are computed: the plain RoPE, or YaRN with its parameters."""

    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_positions: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: unset
    mscale_all_dim: float = 0.0  # 0: unset
    attention_factor: float | None = None  # None: derived from factor (and the mscales)
    truncate: bool = True

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (YaRN's attention factor; 1 for the default)."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_mscale(self.factor)

    def softmax_scale(self, scale: float) -> float:
        """MLA's softmax scale: ``scale * mscale(factor, mscale_all_dim)^2`` under YaRN."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return scale
        mscale = yarn_mscale(self.factor, self.mscale_all_dim)
        return scale * mscale * mscale

    def inv_freq(self, dim: int, theta: float) -> torch.Tensor:  # [dim/2] fp32
        import torch

        """Inverse frequencies of the ``dim`` rotated dims, YaRN-blended when scaled."""
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        pos_freqs = theta**exponent  # [dim/2]
        if self.rope_type == "default":
            return 1.0 / pos_freqs
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (self.factor * pos_freqs)
        low, high = self._correction_range(dim, theta)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # [dim/2] share of the extrapolated frequency
        return interpolation * (1 - keep) + extrapolation * keep

    def _correction_range(self, dim: int, theta: float) -> tuple[float, float]:
        """The dims between ``beta_fast`` and ``beta_slow`` rotations over the original context."""

        def correction_dim(rotations: float) -> float:
            wavelengths = self.original_max_positions / (rotations * 2 * math.pi)
            return (dim * math.log(wavelengths)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)


@dataclass(frozen=True)
class RopeSettings:
    """A checkpoint's rotary settings (see the module)."""

    theta: float
    partial_rotary_factor: float
    scaling: RopeScaling


def parse_rope(
    cfg: dict[str, Any], default_partial: float = 1.0, default_theta: float = 10000.0
) -> RopeSettings:
    """The rope settings of ``config.json``; unsupported rope types raise ``CheckpointError``."""
    params = dict(cfg.get("rope_parameters") or {})  # transformers 5
    scaling = dict(cfg.get("rope_scaling") or {})  # transformers 4.x
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    field = "rope_parameters.rope_type" if params.get("rope_type") else "rope_scaling.type"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{field}={rope_type!r} is not supported (supported: "
            f"{', '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)})"
        )
    theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    partial = default_partial if partial is None else float(partial)
    if not 0 < partial <= 1:
        raise CheckpointError(f"partial_rotary_factor={partial} must be in (0, 1]")
    if rope_type == "default":
        return RopeSettings(theta, partial, RopeScaling())
    if merged.get("factor") is None:
        raise CheckpointError(f"{field}='yarn' needs a 'factor' beside it in config.json")
    original = merged.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings", cfg.get("max_position_embeddings", 4096)
    )
    attention_factor = merged.get("attention_factor")
    return RopeSettings(
        theta,
        partial,
        RopeScaling(
            rope_type="yarn",
            factor=float(merged["factor"]),
            original_max_positions=int(original),
            beta_fast=float(merged.get("beta_fast") or 32),
            beta_slow=float(merged.get("beta_slow") or 1),
            mscale=float(merged.get("mscale") or 0),
            mscale_all_dim=float(merged.get("mscale_all_dim") or 0),
            attention_factor=None if attention_factor is None else float(attention_factor),
            truncate=bool(merged.get("truncate", True)),
        ),
    )
