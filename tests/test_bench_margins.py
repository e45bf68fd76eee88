"""bench/persona/margins.py: the per-item margins behind the next-line task's acc."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("margins", Path(__file__).resolve().parents[1] / "bench" / "persona" / "margins.py")
margins = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(margins)

ITEMS = [
    {"choices": ["a long real line", "short", "mid line"], "label": 0},
    {"choices": ["no", "the real one", "maybe"], "label": 1},
]


def test_margin_is_the_real_line_against_the_best_distractor():
    assert margins.margins(ITEMS, [-10.0, -4.0, -7.0, -3.0, -2.5, -9.0]) == [-6.0, 0.5]
    assert margins.length_gaps(ITEMS, [-10.0, -4.0, -7.0, -3.0, -2.5, -9.0]) == [16 - 5, 12 - 2]


def test_a_mismatched_score_list_is_refused():
    with pytest.raises(SystemExit, match="do not match"):
        margins.margins(ITEMS, [-1.0] * 5)


def test_summary_counts_flips_and_reach():
    per_item = {"base": {"loglik": [-10.0, -4.0, -7.0, -3.0, -2.5, -9.0]}, "tuned": {"loglik": [-3.5, -4.0, -7.0, -3.0, -3.5, -9.0]}}
    row = margins.summarise(ITEMS, per_item)
    assert (row["base_right"], row["tuned_right"], row["flipped_up"], row["flipped_down"]) == (1, 1, 1, 1)
    assert row["base_wrong_within"] == {"1": 0, "2": 0, "5": 0, "10": 1}  # the one wrong item is 6 nats away
    assert row["shift_for_10_points"] is None  # 10 % of 2 items rounds to none
    assert row["shift_mean"] == pytest.approx((6.5 - 1.0) / 2) and row["shift_up_share"] == 0.5
    assert row["real_line_longer_share"] == 1.0


def test_shift_for_ten_points_is_the_margin_of_the_tenth_nearest_wrong_item():
    base = [1.0] * 5 + [-0.5, -2.0, -3.0, -8.0, -20.0] + [-30.0] * 10  # 20 items: +10 points = 2 flips
    assert margins.shift_for(base, 0.10) == 2.0
    assert margins.shift_for([1.0] * 19 + [-1.0], 0.10) is None  # only one wrong item to flip
