"""density_decay_, restoration_scores, accumulate_score_, apply_masks_(_to_grads_), mask_stats:
compiled ops (through the wrappers) against widetopo_ext.reference and hand-computed values."""
import math

import pytest
import torch

import widetopo_ext as W
from widetopo_ext import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (0,), (3, 4), (1, 1), (5, 3, 3, 3), (4, 0, 3), (0, 5), (2, 3, 1, 1), (6, 5, 2), (1, 9)]
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=1e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def impls(op):
    """Run a hand-computed test on the compiled op (through the wrapper) and on the reference."""
    return pytest.mark.parametrize("impl", [pytest.param(W, id="op", marks=pytest.mark.needs_kernel(op)),
                                            pytest.param(R, id="reference")])


def rand_masks(shapes, gen, density=0.5):
    return [torch.rand(s, generator=gen) < density for s in shapes]


def rand_tensors(shapes, dtype, gen):
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def strided_pair(gen, dtype):
    """Non-contiguous views (transposed / sliced / permuted) of tensors and masks."""
    s = [torch.randn(6, 8, generator=gen).to(dtype).t(), torch.randn(3, 4, 5, 2, generator=gen).to(dtype).permute(1, 0, 3, 2),
         torch.randn(6, 9, generator=gen).to(dtype)[:, ::3], torch.randn(10, generator=gen).to(dtype)[::2]]
    m = [(torch.rand(6, 8, generator=gen) < 0.5).t(), (torch.rand(3, 4, 5, 2, generator=gen) < 0.5).permute(1, 0, 3, 2),
         (torch.rand(6, 9, generator=gen) < 0.5)[:, 1::3], (torch.rand(10, generator=gen) < 0.5)[1::2]]
    assert not any(t.is_contiguous() for t in s[:3] + m[:3])
    return s, m


# ---------------------------------------------------------------------------------------------
# density decay
# ---------------------------------------------------------------------------------------------
@impls("density_decay_")
def test_decay_hand_computed(impl):
    # m = [[1, 1, 0], [0, 1, 0]]: out_deg = [2, 1], in_deg = [1, 2, 0].
    # factor[o,i] = m / max(out*in, 1) ** e with e = 1:  [[1/2, 1/4, 0], [0, 1/2, 0]].
    # With e = 0.5: [[2^-0.5, 4^-0.5, 0], [0, 2^-0.5, 0]].
    m = torch.tensor([[True, True, False], [False, True, False]])
    s = torch.full((2, 3), 8.0)
    impl.density_decay_([s], [m], 1.0)
    assert s.tolist() == [[4.0, 2.0, 0.0], [0.0, 4.0, 0.0]]
    s = torch.full((2, 3), 8.0, dtype=torch.float64)
    impl.density_decay_([s], [m], 0.5)
    torch.testing.assert_close(s, 8.0 * torch.tensor([[2 ** -0.5, 0.5, 0], [0, 2 ** -0.5, 0]], dtype=torch.float64))
    # exponent 0: kept entries unchanged, pruned entries 0; rank-1 tensors untouched.
    s, b = torch.full((2, 3), 3.0), torch.tensor([5.0, -1.0])
    impl.density_decay_([s, b], [m, torch.tensor([False, True])], 0.0)
    assert s.tolist() == [[3.0, 3.0, 0.0], [0.0, 3.0, 0.0]] and b.tolist() == [5.0, -1.0]


@impls("density_decay_")
def test_decay_kernel_dims_hand_computed(impl):
    # (O=1, I=2, K=2): m[0,0] = [1, 1], m[0,1] = [1, 0] -> out_deg = [3], in_deg = [2, 1].
    # factors: i=0: 1/(3*2) = 1/6, i=1: 1/(3*1) = 1/3 (pruned: 0). exponent 1.
    m = torch.tensor([[[True, True], [True, False]]])
    s = torch.full((1, 2, 2), 6.0, dtype=torch.float64)
    impl.density_decay_([s], [m], 1.0)
    torch.testing.assert_close(s, torch.tensor([[[1.0, 1.0], [2.0, 0.0]]], dtype=torch.float64))


@pytest.mark.needs_kernel("density_decay_")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [0.0, 0.4, 1.3, -0.5])
def test_decay_against_reference(dtype, exponent, gen):
    for density in (0.0, 0.3, 1.0):
        masks = rand_masks(SHAPES, gen, density)
        scores = rand_tensors(SHAPES, dtype, gen)
        ref = [s.clone() for s in scores]
        W.density_decay_(scores, masks, exponent)
        R.density_decay_(ref, masks, exponent)
        for s, r in zip(scores, ref):
            torch.testing.assert_close(s, r, **TOL[dtype])


@pytest.mark.needs_kernel("density_decay_")
@pytest.mark.parametrize("dtype", DTYPES)
def test_decay_non_contiguous_and_many(dtype, gen):
    scores, masks = strided_pair(gen, dtype)
    ref = [s.clone() for s in scores]
    W.density_decay_(scores, masks, 0.7)
    R.density_decay_(ref, masks, 0.7)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[dtype])
    # 250 tensors in one call
    shapes = [(1 + j % 4, 1 + j % 3, j % 2 + 1) for j in range(250)]
    masks, scores = rand_masks(shapes, gen, 0.6), rand_tensors(shapes, dtype, gen)
    ref = [s.clone() for s in scores]
    W.density_decay_(scores, masks, 0.25)
    R.density_decay_(ref, masks, 0.25)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[dtype])


@pytest.mark.needs_kernel("density_decay_")
def test_decay_view_leaves_rest_of_base(gen):
    base = torch.randn(6, 10, generator=gen)
    before = base.clone()
    view = base[:, 2:7]
    m = torch.rand(6, 5, generator=gen) < 0.5
    ref = view.clone()
    W.density_decay_([view], [m], 1.0)
    R.density_decay_([ref], [m], 1.0)
    torch.testing.assert_close(base[:, 2:7], ref)
    assert torch.equal(base[:, :2], before[:, :2]) and torch.equal(base[:, 7:], before[:, 7:])


# ---------------------------------------------------------------------------------------------
# restoration scores
# ---------------------------------------------------------------------------------------------
@impls("restoration_scores")
def test_restoration_hand_computed(impl):
    # m = [[1, 0, 0], [0, 0, 0]] (O=2, I=3, K=1): out_density = [1/3, 0], in_density = [1/2, 0, 0].
    # pruned (o,i): (1 - od[o]) * (1 - id[i]) + 0.1 * noise[o,i]
    #   (0,1): 2/3 * 1 + 0.1 * 1 = 0.7666..   (0,2): 2/3 + 0.1 * (-1) = 0.5666..
    #   (1,0): 1 * 1/2 + 0 = 0.5   (1,1): 1 + 0.1 * 2 = 1.2   (1,2): 1
    # kept (0,0): 2.  Rank-1 mask [1, 0]: [2, 1], its noise ignored.
    m = torch.tensor([[True, False, False], [False, False, False]])
    noise = torch.tensor([[5.0, 1.0, -1.0], [0.0, 2.0, 0.0]])
    expected = torch.tensor([[2.0, 2 / 3 + 0.1, 2 / 3 - 0.1], [0.5, 1.2, 1.0]])
    out, b = impl.restoration_scores([m, torch.tensor([True, False])], [noise, torch.empty(0)], 0.1)
    assert out.dtype == torch.float32 and b.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert b.tolist() == [2.0, 1.0]


@impls("restoration_scores")
def test_restoration_kernel_dims_hand_computed(impl):
    # (O=2, I=1, K=2): m = [[[1, 0]], [[0, 0]]]; out_density = [1/2, 0], in_density = [1/4].
    # pruned: o=0: (1/2)(3/4) = 0.375, o=1: 1 * 3/4 = 0.75 (noise 0).
    m = torch.tensor([[[True, False]], [[False, False]]])
    (out,) = impl.restoration_scores([m], [torch.zeros(2, 1)], 1e-5)
    torch.testing.assert_close(out, torch.tensor([[[2.0, 0.375]], [[0.75, 0.75]]]))


@pytest.mark.needs_kernel("restoration_scores")
@pytest.mark.parametrize("scale", [1e-5, 0.0, 0.3])
def test_restoration_against_reference(scale, gen):
    for density in (0.0, 0.2, 0.9, 1.0):
        masks = rand_masks(SHAPES, gen, density)
        noise = [torch.randn(m.shape[:2], generator=gen) if m.dim() >= 2 else torch.empty(0) for m in masks]
        out = W.restoration_scores(masks, noise, scale)
        ref = R.restoration_scores(masks, noise, scale)
        assert len(out) == len(masks)
        for o, r, m in zip(out, ref, masks):
            assert o.dtype == torch.float32 and o.shape == m.shape and o.is_contiguous()
            torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)


@pytest.mark.needs_kernel("restoration_scores")
def test_restoration_non_contiguous_many_and_none_noise(gen):
    _, masks = strided_pair(gen, torch.float32)
    noise = [torch.randn(m.shape[1], m.shape[0], generator=gen).t() if m.dim() >= 2 else None for m in masks]
    out = W.restoration_scores(masks, noise)
    ref = R.restoration_scores(masks, noise)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)
    shapes = [(1 + j % 4, 1 + j % 3) if j % 5 else (j % 7,) for j in range(220)]
    masks = rand_masks(shapes, gen, 0.3)
    noise = [torch.randn(m.shape[:2], generator=gen) if m.dim() >= 2 else None for m in masks]
    for o, r in zip(W.restoration_scores(masks, noise), R.restoration_scores(masks, noise)):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)


# ---------------------------------------------------------------------------------------------
# score accumulation
# ---------------------------------------------------------------------------------------------
@impls("accumulate_score_")
def test_accumulate_hand_computed(impl):
    s = torch.tensor([1.0, 1.0, 1.0, 1.0])
    a = torch.tensor([2.0, -3.0, 4.0, math.nan])
    b = torch.tensor([0.5, 2.0, -1.0, 1.0])
    m = torch.tensor([True, True, True, False])
    impl.accumulate_score_([s], [a], [b], [m])          # |a*b*m| = [1, 6, 4, 0 (pruned NaN)]
    assert s.tolist() == [2.0, 7.0, 5.0, 1.0]
    impl.accumulate_score_([s], [a], [b], [m], absolute=False)   # + [1, -6, -4, 0]
    assert s.tolist() == [3.0, 1.0, 1.0, 1.0]
    impl.accumulate_score_([s], [torch.full((4,), -2.0)])  # b = 1, m = 1: += |-2|
    assert s.tolist() == [5.0, 3.0, 3.0, 3.0]


@pytest.mark.needs_kernel("accumulate_score_")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("with_b,with_m", [(True, True), (False, True), (True, False), (False, False)])
def test_accumulate_against_reference(dtype, absolute, with_b, with_m, gen):
    scores = rand_tensors(SHAPES, dtype, gen)
    a, b = rand_tensors(SHAPES, dtype, gen), rand_tensors(SHAPES, dtype, gen)
    masks = rand_masks(SHAPES, gen)
    ref = [s.clone() for s in scores]
    W.accumulate_score_(scores, a, b if with_b else None, masks if with_m else None, absolute=absolute)
    R.accumulate_score_(ref, a, b if with_b else None, masks if with_m else None, absolute=absolute)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[dtype])


@pytest.mark.needs_kernel("accumulate_score_")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_non_contiguous_and_many(dtype, gen):
    scores, masks = strided_pair(gen, dtype)
    # a: reversed-layout views; b: contiguous
    a = [torch.randn(s.shape[::-1], generator=gen).to(dtype).permute(*reversed(range(s.dim()))) for s in scores]
    b = [torch.randn(s.shape, generator=gen).to(dtype) for s in scores]
    ref = [s.clone() for s in scores]
    W.accumulate_score_(scores, a, b, masks, absolute=False)
    R.accumulate_score_(ref, a, b, masks, absolute=False)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[dtype])
    shapes = [(1 + j % 5, 2) if j % 3 else (j % 4,) for j in range(240)]
    scores, a, masks = rand_tensors(shapes, dtype, gen), rand_tensors(shapes, dtype, gen), rand_masks(shapes, gen)
    ref = [s.clone() for s in scores]
    W.accumulate_score_(scores, a, None, masks)
    R.accumulate_score_(ref, a, None, masks)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[dtype])


@pytest.mark.needs_kernel("accumulate_score_")
def test_accumulate_ignores_requires_grad_inputs(gen):
    theta = torch.randn(3, 4, generator=gen, requires_grad=True)
    h = torch.randn(3, 4, generator=gen)
    s = torch.zeros(3, 4)
    W.accumulate_score_([s], [h], [theta])
    torch.testing.assert_close(s, (h * theta.detach()).abs())
    assert not s.requires_grad


# ---------------------------------------------------------------------------------------------
# apply masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.needs_kernel("apply_masks_")
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64])
def test_apply_masks_selection(dtype, gen):
    tensors = [(torch.randn(s, generator=gen) * 10).to(dtype) for s in SHAPES]
    if dtype.is_floating_point:
        for t in tensors:
            if t.numel() >= 3:
                t.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    masks = rand_masks(SHAPES, gen)
    for t, m in zip(tensors, masks):
        if t.numel() >= 3:
            m.view(-1)[:3] = False  # NaN / inf in pruned entries must become exactly 0
    before = [t.clone() for t in tensors]
    W.apply_masks_(tensors, masks)
    for t, b, m in zip(tensors, before, masks):
        assert t.dtype == dtype
        assert torch.equal(t[~m], torch.zeros_like(t[~m]))
        assert torch.equal(t[m], b[m])  # kept entries bitwise unchanged


@pytest.mark.needs_kernel("apply_masks_")
def test_apply_masks_leaf_params_views_and_many(gen):
    w = torch.nn.Parameter(torch.randn(5, 4, generator=gen))
    m = torch.rand(5, 4, generator=gen) < 0.5
    expected = torch.where(m, w.detach(), 0.0)
    W.apply_masks_([w], [m])
    assert torch.equal(w.detach(), expected) and w.requires_grad and w.is_leaf
    base = torch.randn(6, 8, generator=gen)
    before = base.clone()
    mv = torch.rand(8, 3, generator=gen) < 0.5
    W.apply_masks_([base.t()[:, ::2]], [mv])
    assert torch.equal(base.t()[:, ::2], torch.where(mv, before.t()[:, ::2], 0.0))
    assert torch.equal(base[1::2], before[1::2])
    shapes = [(1 + j % 3, 1 + j % 4, 2) for j in range(210)]
    tensors, masks = rand_tensors(shapes, torch.float32, gen), rand_masks(shapes, gen)
    expected = [torch.where(m, t, 0.0) for t, m in zip(tensors, masks)]
    W.apply_masks_(tensors, masks)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))


@pytest.mark.needs_kernel("apply_masks_")
def test_apply_masks_to_grads(gen):
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen)),
              torch.nn.Parameter(torch.randn(2, 2, generator=gen))]
    (params[0].sum() * 3 + params[2].pow(2).sum()).backward()  # params[1].grad stays None
    masks = [torch.tensor([[True, False], [False, True], [True, True]]), torch.tensor([True, False, True, False]),
             torch.tensor([[False, False], [True, False]])]
    values = [p.detach().clone() for p in params]
    g2 = params[2].grad.clone()
    W.apply_masks_to_grads_(params, masks)
    assert params[0].grad.tolist() == [[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]]
    assert params[1].grad is None
    assert torch.equal(params[2].grad, torch.where(masks[2], g2, 0.0))
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values)), "parameters must not change"


# ---------------------------------------------------------------------------------------------
# mask statistics
# ---------------------------------------------------------------------------------------------
@impls("mask_stats")
def test_mask_stats_hand_computed(impl):
    masks = [torch.tensor([[True, False, False], [False, False, False], [True, True, False]]),  # kept 3, outs {0,2}, ins {0,1}
             torch.tensor([True, False, True]),          # rank 1: kept 2 -> (2, 2, 2)
             torch.tensor(True),                         # rank 0: (1, 1, 1)
             torch.zeros(2, 0, 3, dtype=torch.bool),     # empty: zeros
             torch.zeros(4, 2, 2, 2, dtype=torch.bool)]  # nothing kept
    masks[4][3, 1, 0, 1] = True
    expected = [[3, 2, 2], [2, 2, 2], [1, 1, 1], [0, 0, 0], [1, 1, 1]]
    st = impl.mask_stats(masks)
    assert st.dtype == torch.int64 and st.tolist() == expected


@pytest.mark.needs_kernel("mask_stats")
def test_mask_stats_against_reference(gen):
    for density in (0.0, 0.05, 0.5, 1.0):
        masks = rand_masks(SHAPES, gen, density)
        assert torch.equal(W.mask_stats(masks), R.mask_stats(masks))
    _, masks = strided_pair(gen, torch.float32)
    assert torch.equal(W.mask_stats(masks), R.mask_stats(masks))
    shapes = [(1 + j % 6, 1 + j % 5, 3) if j % 4 else (j % 9,) for j in range(260)]
    masks = rand_masks(shapes, gen, 0.1)
    st = W.mask_stats(masks)
    assert st.shape == (260, 3) and torch.equal(st, R.mask_stats(masks))


def test_empty_lists():
    assert W.mask_stats([]).shape == (0, 3)
    assert W.restoration_scores([], []) == []
    assert W.masked_sq_norm([]).item() == 0.0
    assert W.global_threshold([], [], 0).item() == math.inf
    W.density_decay_([], [], 1.0), W.accumulate_score_([], []), W.apply_masks_([], [])


@pytest.mark.needs_kernel("mask_stats", "apply_masks_")
def test_wrappers_accept_tuples_and_generators(gen):
    masks = rand_masks([(3, 4), (5,)], gen)
    assert torch.equal(W.mask_stats(tuple(masks)), W.mask_stats(m for m in masks))
    t = rand_tensors([(3, 4), (5,)], torch.float32, gen)
    expected = [torch.where(m, x, 0.0) for x, m in zip(t, masks)]
    W.apply_masks_((x for x in t), tuple(masks))
    assert all(torch.equal(x, e) for x, e in zip(t, expected))


@pytest.mark.needs_kernel("density_decay_", "restoration_scores", "accumulate_score_", "apply_masks_", "mask_stats",
                          "masked_sq_norm")
def test_large_tensors_parallel_paths(gen):
    # Big enough for several parallel tasks per tensor (rows split across tasks, per-task
    # in-degree partials merged), plus a strided view of a big tensor.
    shapes = [(96, 64, 3, 3), (700, 300), (50_000,)]
    masks = rand_masks(shapes, gen, 0.3)
    masks[1][:, 7] = False  # a dead input unit
    masks[1][11] = False    # a dead output unit
    scores = rand_tensors(shapes, torch.float32, gen)
    ref = [s.clone() for s in scores]
    W.density_decay_(scores, masks, 0.35)
    R.density_decay_(ref, masks, 0.35)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[torch.float32])
    noise = [torch.randn(m.shape[:2], generator=gen) if m.dim() >= 2 else None for m in masks]
    for o, r in zip(W.restoration_scores(masks, noise), R.restoration_scores(masks, noise)):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)
    assert torch.equal(W.mask_stats(masks), R.mask_stats(masks))
    a = rand_tensors(shapes, torch.float32, gen)
    W.accumulate_score_(scores, a, None, masks)
    R.accumulate_score_(ref, a, None, masks)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s, r, **TOL[torch.float32])
    torch.testing.assert_close(W.masked_sq_norm(a, masks), R.masked_sq_norm(a, masks))
    big = torch.randn(400, 600, generator=gen)
    view, mv = big.t()[::2], torch.rand(300, 400, generator=gen) < 0.5
    expected = torch.where(mv, view, 0.0)
    W.apply_masks_([view], [mv])
    assert torch.equal(big.t()[::2], expected)
