"""Mask restoration (docs/design.md §2.3): density path, hand-worked restoration steps, and a multi-step
run against a straightforward PyTorch statement of the same rule."""
import math

import pytest
import torch

from widetopo.engine.restoration import restoration_path, restoration_target, restore_masks

from references import reference_restore

pytestmark = pytest.mark.needs_kernel("restoration_scores", "global_threshold")


def test_restoration_targets():
    # d*^(1/2), then d*^(3/4), then d*^(7/8)
    assert restoration_target(0.01, 0) == pytest.approx(0.1)
    assert restoration_target(0.01, 1) == pytest.approx(0.01 ** 0.75)
    assert restoration_target(0.01, 2) == pytest.approx(0.01 ** 0.875)


def test_restoration_path_is_linear_from_target():
    # d_j = d* + (d_r - d*) j / J with d* = 0.01, d_0 = 0.1, J = 3
    assert restoration_path(0.01, 0, 3) == pytest.approx([0.04, 0.07, 0.1])
    d1 = 0.01 ** 0.75
    assert restoration_path(0.01, 1, 2) == pytest.approx([0.01 + (d1 - 0.01) / 2, d1])


def _hand_mask():
    # out_density = [3/4, 1/2, 1/4], in_density = [1, 2/3, 1/3, 0]
    return torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_one_step_regrows_between_sparsest_units():
    # pruned scores (1-out)(1-in): (0,3) .25, (1,2) 1/3, (1,3) .5, (2,1) .25, (2,2) .5, (2,3) .75
    # target 0.36 -> d_r = 0.6 -> keep round(0.6 * 12) = 7: one more entry, the one at (2, 3).
    m = _hand_mask()
    path = restore_masks([m], 0.36, restoration=0, steps=1, noise_scale=0.0)
    assert path == pytest.approx([0.6])
    expected = _hand_mask()
    expected[2, 3] = True
    assert torch.equal(m, expected)


def test_rank1_pruned_entries_score_one():
    # a pruned bias entry scores 1.0, above every rank >= 2 candidate (max .75): it regrows first.
    # N_P = 14, keep round(0.6 * 14) = 8 (one more than the 7 kept).
    a, b = _hand_mask(), torch.tensor([True, False])
    restore_masks([a, b], 0.36, restoration=0, steps=1, noise_scale=0.0)
    assert torch.equal(a, _hand_mask())
    assert torch.equal(b, torch.tensor([True, True]))


def test_kernel_dims_count_in_unit_densities():
    # conv-shaped (O=2, I=2, K=2): unit 0->0 has both kernel taps, everything else pruned.
    # out_density = [2/4, 0], in_density = [2/4, 0]; pruned scores: (0,1,*) = .5, (1,0,*) = .5,
    # (1,1,*) = 1. Keep 4 of 8 -> the two taps of (1, 1) join: d* = 0.25 -> d_0 = 0.5.
    m = torch.zeros(2, 2, 2, dtype=torch.bool)
    m[0, 0] = True
    restore_masks([m], 0.25, restoration=0, steps=1, noise_scale=0.0)
    expected = torch.zeros(2, 2, 2, dtype=torch.bool)
    expected[0, 0] = expected[1, 1] = True
    assert torch.equal(m, expected)


def test_multi_step_matches_reference_and_only_grows():
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 3, 3, 3), (5, 6), (5,)]
    masks = [torch.rand(s, generator=gen) < 0.05 for s in shapes]
    n = sum(m.numel() for m in masks)
    start = [m.clone() for m in masks]
    expected = reference_restore(masks, 0.04, 0, 5, seed=11, scale=1e-5)
    seen = []

    def on_step(j, d_j):
        seen.append((j, d_j, sum(int(m.sum()) for m in masks)))

    restore_masks(masks, 0.04, restoration=0, steps=5, seed=11, on_step=on_step)
    for got, exp, old in zip(masks, expected, start):
        assert torch.equal(got, exp)
        assert bool((got | ~old).all()), "a kept entry was dropped by restoration"
    path = restoration_path(0.04, 0, 5)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    assert [s[2] for s in seen] == [int(math.floor(d * n + 0.5)) for d in path]


def test_resume_from_step_equals_full_run():
    gen = torch.Generator().manual_seed(4)
    masks = [torch.rand(s, generator=gen) < 0.05 for s in [(8, 4, 3), (6, 8)]]
    full = [m.clone() for m in masks]
    restore_masks(full, 0.05, restoration=1, steps=4, seed=2)
    part = [m.clone() for m in masks]
    restore_masks(part, 0.05, restoration=1, steps=4, seed=2, on_step=lambda j, d: None)
    half = [m.clone() for m in masks]

    class Stop(Exception):
        pass

    def stop_at_2(j, d):
        if j == 2:
            raise Stop

    with pytest.raises(Stop):
        restore_masks(half, 0.05, restoration=1, steps=4, seed=2, on_step=stop_at_2)
    restore_masks(half, 0.05, restoration=1, steps=4, seed=2, start_step=2)
    for a, b, c in zip(full, part, half):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_errors():
    m = [torch.ones(3, 3, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"target must be in \(0, 1\]"):
        restore_masks(m, 0.0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        restore_masks(m, 0.1, steps=0)
    with pytest.raises(ValueError, match="masks must be a non-empty list"):
        restore_masks([], 0.1)
