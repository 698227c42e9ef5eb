"""Checks shared by the tier policy's settings and inputs (cascade, shadow, a request's
retrieval confidence), written once so every bound reads the same wherever it is checked.

Each raises ``ValueError`` starting with ``<name>=<value>`` and saying what is allowed: the
config edge puts such an error on the field's path.
"""

from __future__ import annotations


def check_unit_interval(name: str, value: float) -> None:
    """Refuse ``value`` outside [0, 1]; NaN is refused too."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1]")


def check_at_least_one(name: str, value: int) -> None:
    """Refuse a count below 1."""
    if value < 1:
        raise ValueError(f"{name}={value!r} must be >= 1")


def check_distinct(name: str, value: str, other_name: str, other_value: str) -> None:
    """Refuse two tier names that must differ (a route from a tier to itself)."""
    if value == other_value:
        raise ValueError(f"{name}={value!r} must differ from {other_name}={other_value!r}")
