"""Expert load per tier: a sliding window of per-window summaries and an exponential average.

Engines count the tokens routed to each (layer, expert) (``take_routed_counts``: a dict
keyed by model layer index) and their replicas send those counts here off the hot path.
Reports that arrive within one ``window_s`` are summed into one window's summary (an
[L x E] matrix of ints); the last ``num_windows`` windows make the recent load the planner
sees, and closed windows fold into an exponential average that smooths bursts. Drift is
the mean over layers of the total variation distance between the recent per-layer load
shares and the shares at the last plan: 0 for the same distribution, 1 for disjoint ones.

Ids and ints only: no tensors, no Ray, no clock of its own (callers pass ``now``).

Legend: L MoE layers (in ``moe_layers`` order), E experts per layer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LoadMatrix = list[list[float]]  # [L, E] tokens routed per (MoE layer, expert)


def counts_to_matrix(
    counts: Mapping[tuple[int, int], int], moe_layers: Sequence[int], num_experts: int
) -> list[list[int]]:
    """An engine's ``{(layer, expert): tokens}`` as an [L, E] matrix in ``moe_layers`` order.

    A key outside the model (a dense layer, an expert id out of range) is an input error:
    it means the counts came from another model.
    """
    row_of = {layer: i for i, layer in enumerate(moe_layers)}
    matrix = [[0] * num_experts for _ in moe_layers]
    for (layer, expert), n in counts.items():
        if layer not in row_of or not 0 <= expert < num_experts:
            raise ValueError(
                f"routed count for (layer {layer}, expert {expert}) is outside the model "
                f"(MoE layers {tuple(moe_layers)}, {num_experts} experts)"
            )
        if n < 0:
            raise ValueError(f"routed count for (layer {layer}, expert {expert}) is {n} < 0")
        matrix[row_of[layer]][expert] += int(n)
    return matrix


def shares(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each layer's row divided by its sum (a uniform row where the layer saw no token)."""
    out = []
    for row in matrix:
        total = float(sum(row))
        out.append([x / total for x in row] if total > 0 else [1.0 / len(row)] * len(row))
    return out


def drift(matrix: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> float:
    """Mean over layers of the total variation distance between the two loads' shares, in
    [0, 1]: how much of the routed traffic would have to change experts to turn one into
    the other."""
    assert len(matrix) == len(reference), f"{len(matrix)} layers vs {len(reference)}"
    if not matrix:
        return 0.0
    now, then = shares(matrix), shares(reference)
    per_layer = [
        0.5 * sum(abs(a - b) for a, b in zip(r1, r2, strict=True))
        for r1, r2 in zip(now, then, strict=True)
    ]
    return sum(per_layer) / len(per_layer)


@dataclass
class _Window:
    started_at: float
    counts: list[list[int]]  # [L, E]
    num_reports: int = 0


class LoadWindow:
    """One tier's recent expert load: ``num_windows`` windows of ``window_s`` each, plus an
    exponential average (weight ``ema_alpha`` per closed window) of their matrices."""

    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: int,
        window_s: float = 10.0,
        num_windows: int = 6,
        ema_alpha: float = 0.3,
    ) -> None:
        if window_s <= 0 or num_windows < 1 or not 0 < ema_alpha <= 1:
            raise ValueError(
                f"window_s={window_s} must be > 0, num_windows={num_windows} >= 1 and "
                f"ema_alpha={ema_alpha} in (0, 1]"
            )
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        self.window_s = window_s
        self.ema_alpha = ema_alpha
        self._windows: deque[_Window] = deque(maxlen=num_windows)
        self._ema: LoadMatrix | None = None
        self._reference: LoadMatrix | None = None  # the recent load at the last plan
        self.num_reports = 0

    def add(self, counts: Mapping[tuple[int, int], int], now: float) -> None:
        """Add one replica's counts (``take_routed_counts``'s dict) reported at ``now``."""
        matrix = counts_to_matrix(counts, self.moe_layers, self.num_experts)
        window = self._windows[-1] if self._windows else None
        if window is None or now - window.started_at >= self.window_s:
            if window is not None:
                self._fold(window.counts)
            window = _Window(now, [[0] * self.num_experts for _ in self.moe_layers])
            self._windows.append(window)  # the oldest one falls out
        for row, new in zip(window.counts, matrix, strict=True):
            for e, n in enumerate(new):
                row[e] += n
        window.num_reports += 1
        self.num_reports += 1

    def _fold(self, counts: list[list[int]]) -> None:
        a = self.ema_alpha
        if self._ema is None:
            self._ema = [[float(x) for x in row] for row in counts]
        else:
            self._ema = [
                [a * x + (1 - a) * old for x, old in zip(row, prev, strict=True)]
                for row, prev in zip(counts, self._ema, strict=True)
            ]

    @property
    def num_windows(self) -> int:
        return len(self._windows)

    def recent(self) -> list[list[int]]:
        """[L, E] tokens routed over the windows kept (the open one included)."""
        total = [[0] * self.num_experts for _ in self.moe_layers]
        for window in self._windows:
            for row, counts in zip(total, window.counts, strict=True):
                for e, n in enumerate(counts):
                    row[e] += n
        return total

    def num_tokens(self) -> int:
        """Routed (token, k) pairs over the windows kept."""
        return sum(sum(row) for w in self._windows for row in w.counts)

    def average(self) -> LoadMatrix:
        """The exponential average of closed windows (the open one while none has closed)."""
        if self._ema is not None:
            return [list(row) for row in self._ema]
        if self._windows:
            return [[float(x) for x in row] for row in self._windows[-1].counts]
        return [[0.0] * self.num_experts for _ in self.moe_layers]

    def planning_load(self) -> LoadMatrix:
        """What a plan should balance: the recent windows' shares blended half and half with
        the average's, each scaled to the recent token count (bursts count, but not alone)."""
        recent = self.recent()
        smooth = self.average()
        out: LoadMatrix = []
        for r_row, s_row in zip(recent, smooth, strict=True):
            total = float(sum(r_row))
            blended = [
                0.5 * a + 0.5 * b
                for a, b in zip(shares([r_row])[0], shares([s_row])[0], strict=True)
            ]
            out.append([x * total for x in blended])
        return out

    def mark_planned(self) -> None:
        """The recent load becomes the reference that ``drift`` compares with."""
        self._reference = [[float(x) for x in row] for row in self.recent()]

    def drift(self) -> float:
        """Drift of the recent load from the load at the last plan (0 before any plan)."""
        if self._reference is None:
            return 0.0
        return drift(self.recent(), self._reference)
