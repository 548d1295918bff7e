"""global_threshold (compiled op through the wrapper) against widetopo_ext.reference.

The reference concatenates and stably sorts; the kernel radix-selects without a copy. Masks must
match exactly (ties included) and the returned cut value must be equal.
"""
import math

import pytest
import torch

import widetopo_ext as W
from widetopo_ext import reference as R

needs_op = pytest.mark.needs_kernel("global_threshold")
# Hand-computed examples run on the compiled op (through the wrapper) and on the reference.
both = pytest.mark.parametrize("impl", [pytest.param(W, id="op", marks=needs_op), pytest.param(R, id="reference")])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (0,), (3, 4), (1, 1), (5, 3, 3, 3), (4, 0, 3), (2, 3, 1, 1), (6, 5, 2)]


def random_scores(shapes, dtype, gen, kind="normal"):
    out = []
    for shape in shapes:
        if kind == "normal":
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind == "ties":  # few distinct values: ties everywhere, incl. at the cut
            x = torch.randint(-2, 3, shape, generator=gen).to(torch.float64) * 0.5
        elif kind == "equal":
            x = torch.full(shape, 0.25, dtype=torch.float64)
        else:
            raise AssertionError(kind)
        out.append(x.to(dtype))
    return out


def fresh_masks(scores, fill=False):
    return [torch.full(s.shape, fill, dtype=torch.bool) for s in scores]


def check_against_reference(scores, keep, mode="exact", masks=None, ref_masks=None):
    masks = masks if masks is not None else fresh_masks(scores, fill=True)
    ref_masks = ref_masks if ref_masks is not None else [m.clone() for m in masks]
    thr = W.global_threshold(scores, masks, keep, mode)
    ref_thr = R.global_threshold(scores, ref_masks, keep, mode)
    assert thr.dtype == torch.float64 and thr.dim() == 0
    assert thr.item() == ref_thr.item() or (math.isinf(thr.item()) and math.isinf(ref_thr.item()))
    for j, (m, rm) in enumerate(zip(masks, ref_masks)):
        assert m.dtype == torch.bool
        assert torch.equal(m, rm), f"mask {j} differs from the reference (keep={keep}, mode={mode})"
    if mode == "exact":
        assert sum(int(m.sum()) for m in masks) == keep
    return thr


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("mode", ["exact", "official"])
def test_random_against_reference(dtype, kind, mode, gen):
    scores = random_scores(SHAPES, dtype, gen, kind)
    n = sum(s.numel() for s in scores)
    for keep in sorted({0, 1, 2, n // 3, n // 2, n - 1, n}):
        check_against_reference(scores, keep, mode)


@both
def test_keep_zero_and_all(impl):
    scores = [torch.tensor([[3.0, -1.0], [2.0, 0.5]]), torch.tensor([7.0, -4.0])]
    masks = fresh_masks(scores, fill=True)
    assert impl.global_threshold(scores, masks, 0).item() == math.inf
    assert not any(m.any() for m in masks)
    masks = fresh_masks(scores)
    assert impl.global_threshold(scores, masks, 6).item() == -4.0
    assert all(m.all() for m in masks)
    # official: keep = 0 -> k = N -> everything pruned, +inf; keep = N -> k = 0 prunes the minimum.
    masks = fresh_masks(scores, fill=True)
    assert impl.global_threshold(scores, masks, 0, "official").item() == math.inf
    assert not any(m.any() for m in masks)
    masks = fresh_masks(scores)
    assert impl.global_threshold(scores, masks, 6, "official").item() == -4.0
    assert masks[1].tolist() == [True, False] and masks[0].all()


@both
def test_hand_computed_tie_rule(impl):
    # Scores in (tensor, flat index) order: [1, 2, 2, 0] [2, -0.0, 0.0, 1].
    # Descending stable order: 2 (t0 e1), 2 (t0 e2), 2 (t1 e0), 1 (t0 e0), 1 (t1 e3), 0 (t0 e3),
    # -0.0 (t1 e1), 0.0 (t1 e2)  (-0.0 == 0.0 tie, resolved by position).
    scores = [torch.tensor([[1.0, 2.0], [2.0, 0.0]]), torch.tensor([2.0, -0.0, 0.0, 1.0])]
    expected = {
        2: ([[False, True], [True, False]], [False, False, False, False], 2.0),
        4: ([[True, True], [True, False]], [True, False, False, False], 1.0),
        6: ([[True, True], [True, True]], [True, False, False, True], 0.0),
        7: ([[True, True], [True, True]], [True, True, False, True], 0.0),
    }
    for keep, (m0, m1, thr) in expected.items():
        masks = fresh_masks(scores)
        assert impl.global_threshold(scores, masks, keep).item() == thr
        assert masks[0].tolist() == m0 and masks[1].tolist() == m1, keep
    # official, keep = 5: N = 8, k = 3, ascending [-0, 0, 0, 1, 1, 2, 2, 2], sorted[3] = 1:
    # prune every score <= 1, so only the three 2's survive (ties at the cut all go).
    masks = fresh_masks(scores)
    assert impl.global_threshold(scores, masks, 5, "official").item() == 1.0
    assert masks[0].tolist() == [[False, True], [True, False]] and masks[1].tolist() == [True, False, False, False]


@needs_op
def test_official_ties_and_large_k(gen):
    scores = random_scores([(40,), (5, 6)], torch.float32, gen, "ties")
    n = 70
    for keep in range(0, n + 1, 7):
        check_against_reference(scores, keep, "official")
    # k = N - keep >= N only for keep = 0: all pruned.
    masks = fresh_masks(scores, fill=True)
    assert W.global_threshold(scores, masks, 0, "official").item() == math.inf
    assert not any(m.any() for m in masks)


@both
def test_all_equal_keeps_first_in_order(impl):
    scores = [torch.full((3, 2), 1.5), torch.full((4,), 1.5), torch.full((2, 2, 1, 1), 1.5)]
    masks = fresh_masks(scores)
    assert impl.global_threshold(scores, masks, 8).item() == 1.5
    assert masks[0].all() and masks[1].tolist() == [True, True, False, False] and not masks[2].any()


@needs_op
def test_many_tensors(gen):
    shapes = [tuple(int(d) for d in torch.randint(1, 5, (int(r),), generator=gen)) for r in
              torch.randint(0, 4, (230,), generator=gen)]
    for kind in ("normal", "ties"):
        scores = random_scores(shapes, torch.float32, gen, kind)
        n = sum(s.numel() for s in scores)
        for keep in (0, 1, n // 7, n // 2, n - 1, n):
            check_against_reference(scores, keep)
            check_against_reference(scores, keep, "official")


@needs_op
def test_large_tensor_parallel_paths(gen):
    # Large enough for the multi-threaded histogram passes; plenty of exact ties in float16.
    scores = [torch.randn(120_000, generator=gen).to(torch.float16), torch.randn(64, 33, generator=gen).to(torch.float16)]
    for keep in (12_345, 100_001):
        check_against_reference(scores, keep)
        check_against_reference(scores, keep, "official")
    # ~250 tensors of ~1000 ties-heavy scores: tensor boundaries inside parallel tasks/blocks.
    sizes = torch.randint(500, 1500, (250,), generator=gen).tolist()
    scores = [torch.randint(0, 50, (n,), generator=gen).to(torch.bfloat16) for n in sizes]
    n = sum(sizes)
    for keep in (n // 3, n - 777):
        check_against_reference(scores, keep)
        check_against_reference(scores, keep, "official")


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_tie_group_at_the_cut(dtype, gen):
    # Pruned weights all score 0: far more ties at the cut than any small candidate buffer,
    # so the select must fix every digit and split the tie group across blocks by position.
    shapes = [(30_000,), (120, 250), (70, 10, 3, 3), (9_000,)]
    scores = [torch.randn(s, generator=gen).abs().add_(0.5).to(dtype) for s in shapes]
    for s in scores:
        s.view(-1)[torch.rand(s.numel(), generator=gen) < 0.7] = 0.0
    zeros = sum(int((s == 0).sum()) for s in scores)
    n = sum(s.numel() for s in scores)
    assert zeros > 50_000
    for keep in (n - zeros + 1, n - zeros + zeros // 2 + 3, n, n - zeros):
        check_against_reference(scores, keep)
        check_against_reference(scores, keep, "official")


@needs_op
def test_float32_several_radix_passes(gen):
    # 43k float32 scores in [1, 1.25) share their top digit (sign, exponent, 2 mantissa bits),
    # so the select needs further passes before the candidates are few.
    scores = [torch.rand(25_000, generator=gen) * 0.25 + 1, torch.rand(60, 300, generator=gen) * 0.25 + 1]
    for keep in (1, 17_777, 42_999):
        check_against_reference(scores, keep)
        check_against_reference(scores, keep, "official")


@needs_op
def test_extreme_finite_values():
    for dtype in DTYPES:
        fi = torch.finfo(dtype)
        vals = [fi.max, -fi.max, fi.tiny, -fi.tiny, fi.tiny / 4 if dtype != torch.bfloat16 else fi.tiny,
                0.0, -0.0, 1.0, -1.0, fi.eps, fi.max, -fi.max]
        scores = [torch.tensor(vals[:5], dtype=dtype), torch.tensor(vals[5:], dtype=dtype).reshape(7, 1)]
        for keep in range(0, 13):
            check_against_reference(scores, keep)
            check_against_reference(scores, keep, "official")


@needs_op
def test_non_contiguous_views(gen):
    base_s = torch.randint(0, 4, (6, 8), generator=gen).to(torch.float32)
    base_s4 = torch.randint(0, 4, (3, 4, 5, 2), generator=gen).to(torch.float32)
    scores = [base_s.t(), base_s4.permute(1, 0, 3, 2), base_s[:, ::3]]
    assert not any(s.is_contiguous() for s in scores)
    # Masks: strided views into bigger tensors whose other entries must not be touched.
    mb0 = torch.zeros(8, 12, dtype=torch.bool)
    mb1 = torch.ones(4, 3, 2, 25, dtype=torch.bool)
    mb2 = torch.zeros(6, 8, dtype=torch.bool)
    n = sum(s.numel() for s in scores)
    for keep in (0, 5, n // 2, n):
        for mode in ("exact", "official"):
            mb0.fill_(False), mb1.fill_(True), mb2.fill_(False)
            masks = [mb0[:, ::2], mb1[..., ::5], mb2[:, 1:4]]
            assert [tuple(m.shape) for m in masks] == [tuple(s.shape) for s in scores]
            ref_masks = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
            check_against_reference(scores, keep, mode, masks=masks, ref_masks=ref_masks)
            assert not mb0[:, 1::2].any(), "mask entries outside the view were written"
            untouched = torch.ones(25, dtype=torch.bool)
            untouched[::5] = False
            assert mb1[..., untouched].all()
            assert not mb2[:, 0].any() and not mb2[:, 4:].any()


@needs_op
def test_single_and_empty_tensors():
    scores = [torch.empty(0), torch.tensor([0.5]), torch.empty(3, 0), torch.tensor(2.0)]
    for keep in (0, 1, 2):
        check_against_reference(scores, keep)
        check_against_reference(scores, keep, "official")
    masks = fresh_masks([torch.empty(0)])
    assert W.global_threshold([torch.empty(0)], masks, 0).item() == math.inf


@needs_op
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", ["exact", "official"])
def test_nonfinite_scores_error_names_tensor_and_leaves_masks(bad, mode, gen):
    scores = [torch.randn(4, 4, generator=gen), torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    scores[2][1, 2] = bad
    masks = [torch.rand(s.shape, generator=gen) < 0.5 for s in scores]
    before = [m.clone() for m in masks]
    with pytest.raises((RuntimeError, ValueError), match=r"scores\[2\]"):
        W.global_threshold(scores, masks, 10, mode)
    with pytest.raises((RuntimeError, ValueError), match=r"scores\[2\]"):
        torch.ops.widetopo.global_threshold(scores, masks, 10, mode)
    assert all(torch.equal(m, b) for m, b in zip(masks, before)), "a failed call modified the masks"


# ---- lists long enough for the sampled window (N >= 2^21 scores) ----------------------------
# The kernel guesses a window around the cut from a sample of the keys; these lists take that
# path. The sample only decides how many passes run: the masks must equal the reference however
# the guess turns out, which WIDETOPO_THRESHOLD_WINDOW_SIGMAS=0 (a window far too narrow, so the
# guess misses) and WIDETOPO_CPU_ISA=baseline (the non-AVX2 loops) check as well.
LONG_SHAPES = [(512, 256, 3, 3), (7,), (900_001,), (256, 512), (3, 3)]


def long_scores(dtype, gen, kind):
    """Scores of LONG_SHAPES as views into one flat tensor (cheap to build)."""
    flat = torch.randn(sum(math.prod(s) for s in LONG_SHAPES), generator=gen, dtype=torch.float32)
    if kind == "zeros":  # like pruned weights: 95 % of the scores exactly 0, ties at the cut
        flat[torch.rand(flat.numel(), generator=gen) < 0.95] = 0.0
    elif kind == "one_value":  # one value repeated ~30 000 times among distinct values
        flat[torch.randint(0, flat.numel(), (30_000,), generator=gen)] = 0.75
    flat = flat.to(dtype)
    out, start = [], 0
    for shape in LONG_SHAPES:
        n = math.prod(shape)
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


def _keeps_at_the_ties(scores, value):
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    above, copies = int((flat > value).sum()), int((flat == value).sum())
    return [above + 1, above + copies // 3, above + copies]


def check_long(scores, cases):
    """The op against one stable descending sort of the float64 concatenation (written out
    here, so that one sort serves every (keep, mode) case of a long list)."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices
    ascending = flat[order.flip(0)]
    for keep, mode in cases:
        masks = fresh_masks(scores, fill=True)
        thr = W.global_threshold(scores, masks, keep, mode)
        if mode == "exact":
            expected = torch.zeros_like(flat, dtype=torch.bool)
            expected[order[:keep]] = True
            assert thr.item() == flat[order[keep - 1]].item()
        else:
            cut = ascending[flat.numel() - keep]
            expected = flat > cut
            assert thr.item() == cut.item()
        got = torch.cat([m.reshape(-1) for m in masks])
        assert torch.equal(got, expected), f"masks differ (keep={keep}, mode={mode})"


@needs_op
@pytest.mark.parametrize("sigmas, isa", [(None, None), ("0", None), (None, "baseline")])
def test_long_list_sampled_window(sigmas, isa, gen, monkeypatch):
    if sigmas is not None:
        monkeypatch.setenv("WIDETOPO_THRESHOLD_WINDOW_SIGMAS", sigmas)
    if isa is not None:
        monkeypatch.setenv("WIDETOPO_CPU_ISA", isa)
    scores = long_scores(torch.float32, gen, "normal")
    n = sum(s.numel() for s in scores)
    assert n >= 2 ** 21
    check_long(scores, [(1, "exact"), (n // 10, "exact"), (n - 5, "exact"), (n // 10, "official")])


@needs_op
@pytest.mark.parametrize("kind, value, sigmas", [("zeros", 0.0, None), ("zeros", 0.0, "0"),
                                                 ("one_value", 0.75, None)])
def test_long_list_heavy_ties_at_the_cut(kind, value, sigmas, gen, monkeypatch):
    if sigmas is not None:
        monkeypatch.setenv("WIDETOPO_THRESHOLD_WINDOW_SIGMAS", sigmas)
    scores = long_scores(torch.float32, gen, kind)
    keeps = _keeps_at_the_ties(scores, value)
    check_long(scores, [(k, "exact") for k in keeps] + [(keeps[1], "official")])


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_long_list_other_dtypes(dtype, gen):
    scores = long_scores(dtype, gen, "normal")
    n = sum(s.numel() for s in scores)
    check_long(scores, [(n // 10, "exact"), (n // 2, "exact"), (n // 3, "official")])


@needs_op
def test_long_list_nonfinite_found_in_the_sampled_pass(gen):
    scores = long_scores(torch.float32, gen, "normal")
    scores[2][123_456] = math.nan
    masks = fresh_masks(scores)
    with pytest.raises(RuntimeError, match=r"scores\[2\]"):
        W.global_threshold(scores, masks, 1000)
    assert not any(m.any() for m in masks)
