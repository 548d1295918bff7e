"""Density schedules and keep counts against hand-computed values (docs/design.md §2.1, 2.2)."""
import math

import pytest

from widetopo.engine.schedule import density_schedule, keep_count


def test_poly_is_geometric_from_one():
    # d_t = d*^(t/T): 0.01^(1/4) = 0.316227766, 0.01^(1/2) = 0.1, 0.01^(3/4) = 0.0316227766
    got = density_schedule(0.01, 4)
    assert got == pytest.approx([0.31622776601683794, 0.1, 0.03162277660168379, 0.01], rel=1e-12)
    assert got[-1] == 0.01


def test_poly_from_start():
    # start * (target/start)^(t/T): 0.5 * 0.25^(1/2) = 0.25, then 0.125
    assert density_schedule(0.125, 2, "poly", start=0.5) == pytest.approx([0.25, 0.125])
    assert density_schedule(0.125, 2, "geometric", start=0.5) == pytest.approx([0.25, 0.125])
    assert density_schedule(0.125, 2, "exponential", start=0.5) == pytest.approx([0.25, 0.125])


def test_linear():
    assert density_schedule(0.2, 4, "linear") == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_cosine():
    # target + (1 - target)(1 + cos(pi t/T))/2 with target 0.2, T = 4
    expected = [0.2 + 0.4 * (1 + math.sqrt(0.5)), 0.6, 0.2 + 0.4 * (1 - math.sqrt(0.5)), 0.2]
    assert density_schedule(0.2, 4, "cosine") == pytest.approx(expected)


def test_single_round_and_equal_start():
    assert density_schedule(0.05, 1) == [0.05]
    assert density_schedule(0.3, 3, start=0.3) == pytest.approx([0.3, 0.3, 0.3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=0.0, rounds=3), r"target must be in \(0, 1\]"),
        (dict(target=1.5, rounds=3), r"target must be in \(0, 1\]"),
        (dict(target=float("nan"), rounds=3), r"target must be in \(0, 1\]"),
        (dict(target=0.1, rounds=0), "rounds must be an integer >= 1"),
        (dict(target=0.1, rounds=2.5), "rounds must be an integer >= 1"),
        (dict(target=0.1, rounds=3, kind="step"), "schedule must be one of"),
        (dict(target=0.5, rounds=3, start=0.2), "must not exceed start"),
        (dict(target=0.1, rounds=3, start=0.0), r"start must be in \(0, 1\]"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        density_schedule(**kwargs)


def test_schedule_rejects_non_numbers():
    with pytest.raises(TypeError, match="target must be a number"):
        density_schedule("0.1", 3)


def test_keep_count_exact_rounds_half_up():
    assert keep_count(0.1, 1000, 1234, "exact") == (100, "exact")
    assert keep_count(0.25, 10, 10, "exact") == (3, "exact")  # 2.5 -> 3 (half up)
    assert keep_count(0.24, 10, 10, "exact") == (2, "exact")
    assert keep_count(1.0, 10, 10, "exact") == (10, "exact")


def test_keep_count_official_counts_all_parameters():
    # N_all = 10 (8 prunable + 2 others), d = 0.5: k = floor(0.5 * 10) = 5, keep passed = 8 - 5 = 3
    assert keep_count(0.5, 8, 10, "official") == (3, "official")
    # d = 0.1: k = floor(0.9 * 10) = 9 > N_P = 8 -> keep clipped to 0 (everything pruned)
    assert keep_count(0.1, 8, 10, "official") == (0, "official")
    # d = 1: k = 0 -> keep = N_P (the op still prunes every score <= the smallest one)
    assert keep_count(1.0, 8, 10, "official") == (8, "official")


def test_keep_count_bad_mode():
    with pytest.raises(ValueError, match="count must be one of"):
        keep_count(0.5, 8, 10, "approx")
