"""Input checks for the planner: errors name the field, the bad value and the allowed range."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from router.placement.geometry import Shards

# Bounds on inputs, so one request cannot make the planner allocate without limit.
MAX_LAYERS = 1024
MAX_EXPERTS = 8192
MAX_SHARDS = 4096
MAX_SLOTS_PER_SHARD = 4096
MAX_SLOTS_PER_LAYER = 1 << 16  # G * S
MAX_TOTAL_SLOTS = 1 << 22  # L * G * S
MAX_LOAD = 1e18  # per (layer, expert): token counts, far above any real window
_NUMBER_TYPES = frozenset({int, float})
_REAL = (int, float, np.integer, np.floating)  # numbers a load may hold; bools are refused
_BOOLS = (bool, np.bool_)


def validate_load(load: Any) -> list[list[float]]:
    """The load matrix as [L][E] floats, or ``ValueError`` naming the bad field and limit.

    A fast path checks a row with C-level calls (types, min, max, sum); only a row that
    fails it is walked value by value, to name the first bad one.
    """
    layers = _sequence(load, "load", "a list of layers")
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"load has {len(layers)} layers; allowed 1..{MAX_LAYERS}")
    rows: list[list[float]] = []
    width = -1
    for i, raw in enumerate(layers):
        row = _sequence(raw, f"load[{i}]", "a list of per-expert loads")
        if width < 0:
            width = len(row)
            if not 1 <= width <= MAX_EXPERTS:
                raise ValueError(f"load[0] has {width} experts; allowed 1..{MAX_EXPERTS}")
        elif len(row) != width:
            raise ValueError(
                f"load is ragged: load[{i}] has {len(row)} experts, load[0] has {width}"
            )
        if set(map(type, row)) <= _NUMBER_TYPES:  # bool is its own type: refused below
            try:
                out = list(map(float, row))
            except OverflowError:
                out = []
            if out and min(out) >= 0.0 and max(out) <= MAX_LOAD and math.isfinite(sum(out)):
                rows.append(out)
                continue
        rows.append(_bad_row(i, row))
    return rows


def load_array(load: Any) -> np.ndarray:
    """The load matrix as an [L, E] float64 array; errors as ``validate_load`` gives them.

    One pass: numpy converts the rows, inferring their type (a string, ``None`` or any
    other object gives a non-number dtype; ints and floats give int or float); a bool
    among numbers becomes 0 or 1, so only the 0 and 1 entries are looked up for one.
    Then range and finiteness on the array. An input failing any of that is walked by
    ``validate_load``, which names the first bad value. Numpy's number scalars count as
    numbers, in both.
    """
    layers = _sequence(load, "load", "a list of layers")
    if 1 <= len(layers) <= MAX_LAYERS and type(layers[0]) in (list, tuple):
        width = len(layers[0])
        if 1 <= width <= MAX_EXPERTS and all(
            type(row) in (list, tuple) and len(row) == width for row in layers
        ):
            array = _numbers(layers, width)
            if array is not None and array.min() >= 0.0 and array.max() <= MAX_LOAD:
                return array  # NaN fails both bounds
    return np.array(validate_load(load), dtype=np.float64)  # raises, naming the value


def _numbers(layers: Sequence[Sequence[Any]], width: int) -> np.ndarray | None:
    """[L, E] float64 when every entry is an int or a float, else None."""
    try:
        array = np.array(layers)
    except (OverflowError, ValueError):
        return None
    if array.shape != (len(layers), width) or array.dtype.kind not in "iuf":
        return None  # strings, objects, all bools, ragged
    array = array.astype(np.float64, copy=False)
    for flat in np.flatnonzero((array == 0.0) | (array == 1.0)).tolist():
        row, col = divmod(flat, width)
        if isinstance(layers[row][col], _BOOLS):
            return None  # a bool converted to 0 or 1
    return array


def _bad_row(i: int, row: Sequence[Any]) -> list[float]:
    """Walk a row that failed the fast check; raise naming its first bad value."""
    out = []
    for j, x in enumerate(row):
        if isinstance(x, _BOOLS) or not isinstance(x, _REAL):
            raise ValueError(f"load[{i}][{j}] must be a number, got {type(x).__name__}")
        try:
            v = float(x)
        except OverflowError:
            v = math.inf
        if not 0.0 <= v <= MAX_LOAD:  # NaN fails too
            raise ValueError(f"load[{i}][{j}]={v!r} must be finite and in [0, {MAX_LOAD:g}]")
        out.append(v)
    return out


def validate_current(
    current: Any, num_layers: int, num_experts: int, num_shards: int, slots_per_shard: int
) -> list[Shards]:
    """A current plan as [L][G] lists of expert ids, checked against the load's shape."""
    layers_in = _sequence(current, "current", "a list of layers")
    if len(layers_in) != num_layers:
        raise ValueError(f"current has {len(layers_in)} layers; the load has {num_layers}")
    layers: list[Shards] = []
    for i, raw in enumerate(layers_in):
        shards = _sequence(raw, f"current[{i}]", "a list of shards")
        if len(shards) != num_shards:
            raise ValueError(f"current[{i}] has {len(shards)} shards; num_shards={num_shards}")
        layer: Shards = [
            list(_sequence(held, f"current[{i}][{g}]", "a list of expert ids"))
            for g, held in enumerate(shards)
        ]
        flat = [e for held in layer for e in held]
        if flat and not (
            set(map(type, flat)) == {int} and min(flat) >= 0 and max(flat) < num_experts
        ):
            for g, held in enumerate(layer):
                for e in held:
                    if type(e) is not int or not 0 <= e < num_experts:
                        shown = e if type(e) is int else type(e).__name__
                        raise ValueError(
                            f"current[{i}][{g}] has expert id {shown}; allowed 0..{num_experts - 1}"
                        )
        for g, held in enumerate(layer):
            if len(held) > slots_per_shard:
                raise ValueError(
                    f"current[{i}][{g}] holds {len(held)} experts; "
                    f"slots_per_shard={slots_per_shard}"
                )
            if len(set(held)) != len(held):
                raise ValueError(f"current[{i}][{g}] lists an expert twice")
        layers.append(layer)
    return layers


def _sequence(value: Any, field: str, what: str) -> Sequence[Any]:
    """``value`` if it is a list or tuple (or another non-string sequence), else an error."""
    if type(value) in (list, tuple):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{field} must be {what}, got {type(value).__name__}")
    return value


def check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = value if isinstance(value, int) else type(value).__name__
        raise ValueError(f"{field}={shown} must be an integer in [{low}, {high}]")
