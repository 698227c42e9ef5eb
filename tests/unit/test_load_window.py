"""The per-tier load window: summaries summed per window, old windows dropped, the
exponential average, and drift from the load at the last plan."""

from __future__ import annotations

import pytest

from router.load_window import LoadWindow, counts_to_matrix, drift

LAYERS = (1, 3)  # MoE layers of a model whose layers 0 and 2 are dense


def test_counts_become_a_matrix_in_moe_layer_order() -> None:
    assert counts_to_matrix({(3, 1): 5, (1, 0): 2}, LAYERS, 2) == [[2, 0], [0, 5]]


@pytest.mark.parametrize("key", [(0, 0), (1, 2), (1, -1)])
def test_counts_outside_the_model_are_refused(key: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=f"layer {key[0]}, expert {key[1]}"):
        counts_to_matrix({key: 1}, LAYERS, 2)


def test_reports_in_one_window_sum_and_old_windows_fall_out() -> None:
    window = LoadWindow(LAYERS, 2, window_s=10.0, num_windows=2)
    window.add({(1, 0): 3}, now=0.0)
    window.add({(1, 0): 1, (3, 1): 2}, now=5.0)  # same window
    assert window.num_windows == 1
    assert window.recent() == [[4, 0], [0, 2]]
    window.add({(1, 1): 7}, now=10.0)  # a second window
    window.add({(3, 0): 1}, now=21.0)  # a third: the first falls out
    assert window.num_windows == 2
    assert window.recent() == [[0, 7], [1, 0]]
    assert window.num_tokens() == 8


def test_exponential_average_folds_closed_windows() -> None:
    window = LoadWindow((0,), 2, window_s=1.0, num_windows=3, ema_alpha=0.5)
    window.add({(0, 0): 10}, now=0.0)
    assert window.average() == [[10.0, 0.0]]  # the open window while none has closed
    window.add({(0, 1): 10}, now=1.0)  # closes the first: ema = it
    assert window.average() == [[10.0, 0.0]]
    window.add({(0, 1): 10}, now=2.0)  # closes the second: 0.5 * [0, 10] + 0.5 * [10, 0]
    assert window.average() == [[5.0, 5.0]]


def test_planning_load_keeps_the_recent_token_count() -> None:
    window = LoadWindow((0,), 2, window_s=1.0)
    window.add({(0, 0): 30, (0, 1): 10}, now=0.0)
    assert sum(window.planning_load()[0]) == pytest.approx(40.0)


def test_drift_is_zero_for_the_same_shares_and_one_for_disjoint_ones() -> None:
    assert drift([[1, 3]], [[10, 30]]) == pytest.approx(0.0)
    assert drift([[1, 0]], [[0, 5]]) == pytest.approx(1.0)
    assert drift([[1, 1], [1, 0]], [[1, 1], [0, 1]]) == pytest.approx(0.5)  # mean of layers


def test_drift_is_measured_from_the_load_at_the_last_plan() -> None:
    window = LoadWindow((0,), 4, window_s=1.0, num_windows=1)
    window.add({(0, 0): 50, (0, 1): 50}, now=0.0)
    assert window.drift() == 0.0  # no plan yet
    window.mark_planned()
    window.add({(0, 2): 50, (0, 3): 50}, now=1.0)  # the only window kept: disjoint experts
    assert window.drift() == pytest.approx(1.0)


def test_bad_window_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="window_s=0"):
        LoadWindow((0,), 2, window_s=0)
