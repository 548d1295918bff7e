"""CUDA kernels of every widetopo op, against widetopo_ext.reference (pure PyTorch, run on the
same CUDA inputs) and against the CPU kernels (run on CPU copies).

Everything here needs a CUDA device and a build with the CUDA backend (FORCE_CUDA=1); without
them the tests are skipped and say why. The registration itself is checked by
test_cuda_kernels_registered whenever the extension reports CUDA kernels.
"""
import math

import pytest
import torch

import widetopo_ext as W
from widetopo_ext import reference as R

ops = torch.ops.widetopo
OPS = W.OPS


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False); CUDA kernels only build-tested here"
    info = W.build_info()
    missing = [op for op in OPS if not info["cuda_kernels"].get(op, False)]
    if missing:
        return (f"widetopo_ext._C was built without CUDA kernels for {', '.join(missing)} "
                f"(rebuild with FORCE_CUDA=1)")
    return None


_REASON = _cuda_skip_reason()
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
needs_cpu = pytest.mark.needs_kernel(*OPS)  # the CPU comparison needs the CPU kernels too

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (0,), (3, 4), (1, 1), (5, 3, 3, 3), (4, 0, 3), (2, 3, 1, 1), (6, 5, 2),
          (40, 700)]  # the last one spans several 16K / 32K chunks


def test_cuda_kernels_registered():
    """A build that reports CUDA has a CUDA kernel for every op (the CI check of issue 2)."""
    info = W.build_info()
    if not info["with_cuda"]:
        pytest.skip("widetopo_ext._C was built without CUDA (CPU-only build); nothing to check")
    missing = [op for op in OPS if not info["cuda_kernels"][op]]
    assert not missing, f"no CUDA kernel for {missing}"


def _gen(seed=20261122):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _scores(shapes, dtype, gen, kind="normal"):
    out = []
    for shape in shapes:
        if kind == "normal":
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind == "ties":
            x = torch.randint(-2, 3, shape, generator=gen).to(torch.float64) * 0.5
        elif kind == "equal":
            x = torch.full(shape, 0.25, dtype=torch.float64)
        elif kind == "zeros":  # like pruned scores: mostly exact zeros, a few positives
            x = torch.randn(shape, generator=gen, dtype=torch.float64).abs()
            x = torch.where(torch.rand(shape, generator=gen) < 0.8, torch.zeros_like(x), x)
        else:
            raise AssertionError(kind)
        out.append(x.to(dtype))
    return out


def _masks(shapes, gen, p=0.5):
    return [torch.rand(s, generator=gen) < p for s in shapes]


def _cuda(ts):
    return [t.cuda() for t in ts]


def _cpu(ts):
    return [t.cpu() for t in ts]


# ---------------------------------------------------------------------------------------------
# global_threshold
# ---------------------------------------------------------------------------------------------
def _check_threshold(scores_cpu, keep, mode):
    """CUDA op vs reference (on CUDA) vs CPU op: identical masks and cut value."""
    scores = _cuda(scores_cpu)
    masks = [torch.ones(s.shape, dtype=torch.bool, device="cuda") for s in scores]
    ref_masks = [m.clone() for m in masks]
    cpu_masks = _cpu(masks)
    thr = ops.global_threshold(scores, masks, keep, mode)
    ref = R.global_threshold(scores, ref_masks, keep, mode)
    cpu = ops.global_threshold(scores_cpu, cpu_masks, keep, mode)
    assert thr.device.type == "cuda" and thr.dtype == torch.float64 and thr.dim() == 0
    for other in (ref.item(), cpu.item()):
        assert thr.item() == other or (math.isinf(thr.item()) and math.isinf(other) and other > 0)
    for j, (m, rm, cm) in enumerate(zip(masks, ref_masks, cpu_masks)):
        assert torch.equal(m, rm), f"mask {j} differs from the reference (keep={keep}, mode={mode})"
        assert torch.equal(m.cpu(), cm), f"mask {j} differs from the CPU kernel (keep={keep}, mode={mode})"
    if mode == "exact":
        assert sum(int(m.sum()) for m in masks) == keep


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "zeros"])
@pytest.mark.parametrize("mode", ["exact", "official"])
def test_threshold_against_reference(dtype, kind, mode):
    scores = _scores(SHAPES, dtype, _gen(), kind)
    n = sum(s.numel() for s in scores)
    for keep in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        _check_threshold(scores, keep, mode)


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("mode", ["exact", "official"])
def test_threshold_many_tensors(mode):
    """> 64 tensors per call: several multi-tensor launches; chunk ids stay in list order."""
    g = _gen(1)
    shapes = [(int(torch.randint(0, 5, (1,), generator=g)), 3) for _ in range(250)] + [(70000,)]
    scores = _scores(shapes, torch.float32, g, "ties")
    n = sum(s.numel() for s in scores)
    for keep in (1, n // 4, n // 2, n - 3):
        _check_threshold(scores, keep, mode)


@needs_cuda
def test_threshold_tie_order_across_chunks():
    """All-equal scores in a tensor spanning many chunks: exactly the first `keep` entries in
    (tensor, flat index) order are kept - a hand-computable answer."""
    scores = [torch.zeros(5, device="cuda"), torch.zeros(300001, device="cuda"), torch.zeros(7, device="cuda")]
    masks = [torch.zeros(s.shape, dtype=torch.bool, device="cuda") for s in scores]
    keep = 5 + 123457
    thr = ops.global_threshold(scores, masks, keep, "exact")
    assert thr.item() == 0.0
    assert bool(masks[0].all())
    assert int(masks[1].sum()) == 123457 and bool(masks[1][:123457].all())
    assert not bool(masks[2].any())


@needs_cuda
def test_threshold_hand_computed():
    s = [torch.tensor([3.0, -1.0, 2.0], device="cuda"), torch.tensor([[2.0, 5.0], [-0.0, 0.0]], device="cuda")]
    m = [torch.zeros(3, dtype=torch.bool, device="cuda"), torch.zeros(2, 2, dtype=torch.bool, device="cuda")]
    thr = ops.global_threshold(s, m, 3, "exact")  # 5, 3, and the first 2 (tensor 0 before tensor 1)
    assert thr.item() == 2.0
    assert m[0].tolist() == [True, False, True] and m[1].tolist() == [[False, True], [False, False]]
    thr = ops.global_threshold(s, m, 3, "official")  # k = 7 - 3 = 4: sorted asc [-1,-0,0,2,2,3,5][4] = 2
    assert thr.item() == 2.0
    assert m[0].tolist() == [True, False, False] and m[1].tolist() == [[False, True], [False, False]]
    thr = ops.global_threshold(s, m, 0, "exact")
    assert math.isinf(thr.item()) and not any(bool(x.any()) for x in m)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_non_contiguous(dtype):
    g = _gen(2)
    base = _scores([(8, 6), (4, 3, 5)], dtype, g, "ties")
    scores = [base[0].cuda().t(), base[1].cuda().permute(2, 0, 1)]  # (6, 8), (5, 4, 3)
    masks = [torch.ones(8, 6, dtype=torch.bool, device="cuda").t(),
             torch.ones(4, 3, 5, dtype=torch.bool, device="cuda").permute(2, 0, 1)]
    assert all(not x.is_contiguous() for x in scores + masks)
    ref_masks = [torch.ones(m.shape, dtype=torch.bool, device="cuda") for m in masks]
    thr = ops.global_threshold(scores, masks, 40, "exact")
    ref = R.global_threshold(scores, ref_masks, 40, "exact")
    assert thr.item() == ref.item()
    for m, rm in zip(masks, ref_masks):
        assert torch.equal(m, rm)


@needs_cuda
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_non_finite_names_tensor_and_leaves_masks(bad, dtype):
    scores = [torch.randn(4, 4, device="cuda").to(dtype) for _ in range(5)]
    scores[3][2, 1] = bad
    scores[4][0, 0] = bad
    masks = [torch.rand(4, 4, device="cuda") < 0.5 for _ in range(5)]
    before = [m.clone() for m in masks]
    for keep in (0, 7):
        with pytest.raises(RuntimeError, match=r"scores\[3\]"):
            ops.global_threshold(scores, masks, keep, "exact")
        for m, b in zip(masks, before):
            assert torch.equal(m, b)


@needs_cuda
def test_threshold_errors():
    s = [torch.randn(3, 4, device="cuda")]
    m = [torch.zeros(3, 4, dtype=torch.bool, device="cuda")]
    with pytest.raises(RuntimeError, match="keep"):
        ops.global_threshold(s, m, 13, "exact")
    with pytest.raises(RuntimeError, match="keep"):
        ops.global_threshold(s, m, -1, "exact")
    with pytest.raises(RuntimeError, match="mode"):
        ops.global_threshold(s, m, 1, "fast")
    with pytest.raises(RuntimeError, match="same length"):
        ops.global_threshold(s, m + m, 1, "exact")
    with pytest.raises(RuntimeError, match=r"masks\[0\].*bool"):
        ops.global_threshold(s, [m[0].float()], 1, "exact")
    with pytest.raises(RuntimeError, match=r"masks\[0\].*shape"):
        ops.global_threshold(s, [m[0].t()], 1, "exact")
    with pytest.raises(RuntimeError, match=r"masks\[0\].*cuda"):
        ops.global_threshold(s, [m[0].cpu()], 1, "exact")
    with pytest.raises(RuntimeError, match=r"scores\[1\].*dtype"):
        ops.global_threshold(s + [s[0].double()], m + m, 1, "exact")
    with pytest.raises(RuntimeError, match=r"scores\[0\].*float32"):
        ops.global_threshold([s[0].int()], m, 1, "exact")


@needs_cuda
def test_threshold_current_stream_and_device():
    """Runs on the caller's current stream (no stray work on the default stream) and on the
    tensors' device even when another device is current."""
    scores = _scores([(50, 30), (30,)], torch.float32, _gen(3), "ties")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(dev):
        stream = torch.cuda.Stream()
    s = [x.to(dev) for x in scores]
    m = [torch.zeros(x.shape, dtype=torch.bool, device=dev) for x in s]
    stream.wait_stream(torch.cuda.current_stream(dev))  # inputs were written on the default stream
    with torch.cuda.device(0), torch.cuda.stream(stream):
        thr = ops.global_threshold(s, m, 700, "exact")
    stream.synchronize()
    ref_m = [torch.zeros(x.shape, dtype=torch.bool, device=dev) for x in s]
    ref = R.global_threshold(s, ref_m, 700, "exact")
    assert thr.device == dev and thr.item() == ref.item()
    for a, b in zip(m, ref_m):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# density_decay_, restoration_scores, mask_stats
# ---------------------------------------------------------------------------------------------
@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [0.0, 0.4, 1.3])
def test_density_decay(dtype, exponent):
    g = _gen(4)
    scores = _scores(SHAPES, dtype, g)
    masks = _masks(SHAPES, g, 0.6)
    got = _cuda(scores)
    ref = _cuda(scores)
    cpu = [s.clone() for s in scores]
    ops.density_decay_(got, _cuda(masks), exponent)
    R.density_decay_(ref, _cuda(masks), exponent)
    ops.density_decay_(cpu, masks, exponent)
    tol = dict(rtol=1e-6, atol=0) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=0)
    for j, (a, r, c) in enumerate(zip(got, ref, cpu)):
        torch.testing.assert_close(a, r, **tol, msg=f"tensor {j} vs reference")
        torch.testing.assert_close(a.cpu(), c, **tol, msg=f"tensor {j} vs CPU kernel")
        if scores[j].dim() < 2:
            assert torch.equal(a.cpu(), scores[j]), "rank < 2 scores must be untouched"


@needs_cuda
def test_density_decay_hand_computed_and_non_contiguous():
    # mask (O=2, I=2): out_deg = [2, 1], in_deg = [2, 1]; factor = (out*in)^-1 on kept entries.
    m = torch.tensor([[True, True], [True, False]], device="cuda")
    s = torch.full((2, 2), 4.0, device="cuda").t()  # non-contiguous (symmetric values)
    ops.density_decay_([s], [m.t()], 1.0)  # decays in the transposed layout
    # transposed mask is the same matrix (symmetric), so the result is [[1, 2], [2, 0]]
    assert s.tolist() == [[1.0, 2.0], [2.0, 0.0]]


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("scale", [0.0, 1e-5, 0.3])
def test_restoration_scores(scale):
    g = _gen(5)
    masks = _masks(SHAPES, g, 0.3)
    noise = [torch.randn(s[0], s[1], generator=g) if len(s) >= 2 else torch.empty(0) for s in SHAPES]
    got = ops.restoration_scores(_cuda(masks), _cuda(noise), scale)
    ref = R.restoration_scores(_cuda(masks), _cuda(noise), scale)
    cpu = ops.restoration_scores(masks, noise, scale)
    for j, (a, r, c) in enumerate(zip(got, ref, cpu)):
        assert a.dtype == torch.float32 and a.shape == masks[j].shape and a.is_cuda and a.is_contiguous()
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7, msg=f"tensor {j} vs reference")
        torch.testing.assert_close(a.cpu(), c, rtol=1e-6, atol=1e-7, msg=f"tensor {j} vs CPU kernel")


@needs_cuda
def test_restoration_errors():
    m = [torch.ones(3, 4, dtype=torch.bool, device="cuda")]
    with pytest.raises(RuntimeError, match=r"noise\[0\].*shape"):
        ops.restoration_scores(m, [torch.zeros(4, 3, device="cuda")], 1e-5)
    with pytest.raises(RuntimeError, match=r"noise\[0\].*float32"):
        ops.restoration_scores(m, [torch.zeros(3, 4, device="cuda", dtype=torch.float64)], 1e-5)
    with pytest.raises(RuntimeError, match="noise_scale"):
        ops.restoration_scores(m, [torch.zeros(3, 4, device="cuda")], float("nan"))


@needs_cuda
@needs_cpu
def test_mask_stats():
    g = _gen(6)
    shapes = SHAPES + [(300, 200, 3)] + [(3, 2)] * 100  # many tensors, multi-chunk degrees
    masks = _masks(shapes, g, 0.02)
    masks.append(torch.zeros(4, 5, dtype=torch.bool))
    got = ops.mask_stats(_cuda(masks))
    assert got.is_cuda and got.dtype == torch.int64 and got.shape == (len(masks), 3)
    assert torch.equal(got, R.mask_stats(_cuda(masks)))
    assert torch.equal(got.cpu(), ops.mask_stats(masks))


# ---------------------------------------------------------------------------------------------
# accumulate_score_, masked_sq_norm, apply_masks_
# ---------------------------------------------------------------------------------------------
@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("with_m", [True, False])
def test_accumulate_score(dtype, absolute, with_b, with_m):
    g = _gen(7)
    s = _scores(SHAPES, dtype, g)
    a = _scores(SHAPES, dtype, g)
    b = _scores(SHAPES, dtype, g) if with_b else []
    m = _masks(SHAPES, g) if with_m else []
    got, ref, cpu = _cuda(s), _cuda(s), [x.clone() for x in s]
    ops.accumulate_score_(got, _cuda(a), _cuda(b), _cuda(m), absolute)
    R.accumulate_score_(ref, _cuda(a), _cuda(b) or None, _cuda(m) or None, absolute)
    ops.accumulate_score_(cpu, a, b, m, absolute)
    # nvcc may contract s + a*b into one fma: allow a rounding step of the score dtype.
    tol = {torch.float32: 1e-6, torch.float64: 1e-14}.get(dtype, 1e-2)
    for j, (x, r, c) in enumerate(zip(got, ref, cpu)):
        torch.testing.assert_close(x, r, rtol=tol, atol=tol, msg=f"tensor {j} vs reference")
        torch.testing.assert_close(x.cpu(), c, rtol=tol, atol=tol, msg=f"tensor {j} vs CPU kernel")


@needs_cuda
def test_accumulate_non_contiguous_and_nan_pruned():
    s = torch.zeros(4, 3, device="cuda").t()
    a = torch.full((3, 4), float("nan"), device="cuda")
    m = torch.zeros(3, 4, dtype=torch.bool, device="cuda")
    m[0, 1] = True
    a[0, 1] = -2.0
    ops.accumulate_score_([s], [a], [], [m], True)
    expect = torch.zeros(3, 4, device="cuda")
    expect[0, 1] = 2.0
    assert torch.equal(s, expect)


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_m", [True, False])
def test_masked_sq_norm(dtype, with_m):
    g = _gen(8)
    shapes = SHAPES + [(100000,)]
    t = _scores(shapes, dtype, g)
    m = _masks(shapes, g) if with_m else []
    got = ops.masked_sq_norm(_cuda(t), _cuda(m))
    ref = R.masked_sq_norm(_cuda(t), _cuda(m) or None)
    cpu = ops.masked_sq_norm(t, m)
    out_t = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert got.is_cuda and got.dim() == 0 and got.dtype == out_t
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got.cpu(), cpu, **tol)


@needs_cuda
def test_masked_sq_norm_empty_and_deterministic():
    assert ops.masked_sq_norm([torch.zeros(0, 3, device="cuda")], []).item() == 0.0
    x = [torch.randn(300000, device="cuda"), torch.randn(7, 3, device="cuda")]
    first = ops.masked_sq_norm(x, [])
    for _ in range(3):
        assert torch.equal(ops.masked_sq_norm(x, []), first)


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_apply_masks(dtype):
    g = _gen(9)
    shapes = SHAPES + [(3, 4)] * 80
    t = [(torch.randn(s, generator=g) * 10).to(dtype) for s in shapes]
    if dtype.is_floating_point:
        t[4].view(-1)[0] = float("nan")
        t[4].view(-1)[1] = float("inf")
    m = _masks(shapes, g)
    got, ref, cpu = _cuda(t), _cuda(t), [x.clone() for x in t]
    ops.apply_masks_(got, _cuda(m))
    R.apply_masks_(ref, _cuda(m))
    ops.apply_masks_(cpu, m)
    for j, (x, r, c) in enumerate(zip(got, ref, cpu)):
        assert torch.equal(x, r) or (dtype.is_floating_point and torch.allclose(x, r, equal_nan=True)), j
        assert torch.equal(x.cpu(), c) or torch.allclose(x.cpu(), c, equal_nan=True), j
        pruned = ~m[j]
        assert bool((x.cpu()[pruned] == 0).all()), f"tensor {j}: pruned entries must be exactly 0"


@needs_cuda
def test_apply_masks_non_contiguous_and_errors():
    t = torch.arange(12.0, device="cuda").reshape(3, 4).t()
    m = torch.zeros(4, 3, dtype=torch.bool, device="cuda")
    m[1, 2] = True
    ops.apply_masks_([t], [m])
    expect = torch.zeros(4, 3, device="cuda")
    expect[1, 2] = 9.0
    assert torch.equal(t, expect)
    with pytest.raises(RuntimeError, match=r"tensors\[0\].*dtype"):
        ops.apply_masks_([torch.zeros(2, device="cuda", dtype=torch.complex64)], [torch.ones(2, dtype=torch.bool, device="cuda")])
    with pytest.raises(RuntimeError, match=r"masks\[0\]"):
        ops.apply_masks_([torch.zeros(2, device="cuda")], [torch.ones(3, dtype=torch.bool, device="cuda")])


# ---------------------------------------------------------------------------------------------
# schemas / fake kernels on CUDA inputs
# ---------------------------------------------------------------------------------------------
@needs_cuda
def test_opcheck_cuda():
    g = _gen(10)
    shapes = [(3, 4), (5,), (2, 3, 2, 2)]
    sc = _cuda(_scores(shapes, torch.float32, g))
    mk = _cuda(_masks(shapes, g))
    noise = [torch.randn(3, 4, device="cuda"), torch.empty(0, device="cuda"), torch.randn(2, 3, device="cuda")]
    cases = [
        (ops.global_threshold, ([x.clone() for x in sc], [x.clone() for x in mk], 7, "exact")),
        (ops.density_decay_, ([x.clone() for x in sc], mk, 0.5)),
        (ops.restoration_scores, (mk, noise, 1e-5)),
        (ops.accumulate_score_, ([x.clone() for x in sc], sc, sc, mk, True)),
        (ops.masked_sq_norm, (sc, mk)),
        (ops.apply_masks_, ([x.clone() for x in sc], mk)),
        (ops.mask_stats, (mk,)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# defects found by reading the CUDA code (issue 11, section 5)
# ---------------------------------------------------------------------------------------------
@needs_cuda
def test_cross_entry_aliasing_refused_on_cuda():
    """One launch covers the whole list, so entries sharing memory would race: refused, with
    the argument named, before anything is written."""
    s = torch.zeros(64, 33, device="cuda")
    a = [torch.ones(64, 33, device="cuda"), torch.ones(64, 33, device="cuda")]
    with pytest.raises(RuntimeError, match=r"scores\[1\] shares memory with scores\[0\]"):
        ops.accumulate_score_([s, s], a, [], [], True)
    assert not bool(s.any())
    m = torch.zeros(64, 33, dtype=torch.bool, device="cuda")
    sc = [torch.randn(64, 33, device="cuda"), torch.randn(64, 33, device="cuda")]
    with pytest.raises(RuntimeError, match=r"masks\[1\] shares memory with masks\[0\]"):
        ops.global_threshold(sc, [m, m], 100, "exact")
    assert not bool(m.any())
    flat = torch.zeros(100, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match=r"masks\[1\] shares memory with masks\[0\]"):
        ops.global_threshold([torch.randn(60, device="cuda"), torch.randn(60, device="cuda")],
                             [flat[:60], flat[40:]], 10, "exact")


@needs_cuda
@needs_cpu
def test_restoration_scores_bit_equal_to_cpu_at_large_noise_scale():
    """No fused multiply-add on the GPU: with noise_scale = 1 every pruned score is
    (1 - d_out)(1 - d_in) + noise with two rounded products and a rounded sum on both
    backends, so the restored connections cannot differ between CPU and GPU."""
    g = _gen(11)
    shapes = [(300, 200), (64, 32, 3, 3), (10, 7)]
    masks = _masks(shapes, g, 0.3)
    noise = [torch.randn(s[0], s[1], generator=g) * 3.0 for s in shapes]
    for scale in (1.0, 0.37, 1e-5):
        got = ops.restoration_scores(_cuda(masks), _cuda(noise), scale)
        cpu = ops.restoration_scores(masks, noise, scale)
        for j, (a, c) in enumerate(zip(got, cpu)):
            assert torch.equal(a.cpu(), c), f"tensor {j}, scale {scale}: GPU and CPU round differently"


@needs_cuda
@needs_cpu
def test_accumulate_score_bit_equal_to_cpu():
    """S + a * b (signed) must not become one fused multiply-add on the GPU."""
    g = _gen(12)
    for dtype in (torch.float32, torch.float64):
        s = [torch.randn(5000, generator=g, dtype=dtype)]
        a = [torch.randn(5000, generator=g, dtype=dtype)]
        b = [torch.randn(5000, generator=g, dtype=dtype)]
        gpu = _cuda(s)
        ops.accumulate_score_(gpu, _cuda(a), _cuda(b), [], False)
        ops.accumulate_score_(s, a, b, [], False)
        assert torch.equal(gpu[0].cpu(), s[0]), dtype


@needs_cuda
def test_cpu_masks_with_cuda_noise_is_an_argument_error():
    """A CUDA noise tensor beside CPU masks used to reach the CUDA kernel (device-guard error);
    now the shared argument check names the argument and the devices."""
    masks = [torch.ones(5, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
    with pytest.raises(RuntimeError, match=r"noise\[0\] must be on cpu"):
        ops.restoration_scores(masks, [torch.zeros(0, device="cuda"), torch.zeros(3, 4)], 1e-5)
    with pytest.raises(RuntimeError, match=r"noise\[1\] must be on cpu"):
        ops.restoration_scores(masks, [torch.zeros(0), torch.zeros(3, 4, device="cuda")], 1e-5)
    with pytest.raises(ValueError, match=r"noise\[0\] is on cuda"):
        W.restoration_scores(masks, [torch.zeros(0, device="cuda"), torch.zeros(3, 4)], 1e-5)
    with pytest.raises(RuntimeError, match=r"masks\[1\] must be on cuda"):
        ops.global_threshold([torch.randn(4, device="cuda"), torch.randn(4, device="cuda")],
                             [torch.zeros(4, dtype=torch.bool, device="cuda"), torch.zeros(4, dtype=torch.bool)],
                             2, "exact")


@needs_cuda
@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_degrees_32_bit_unit_index(dtype):
    """Degree kernels take 32-bit divisions for tensors below 2^32 elements: same decay as
    the CPU on shapes with odd I and K (pow may differ by an ulp between the backends' math
    libraries, hence a tolerance of the storage dtype)."""
    g = _gen(13)
    shapes = [(37, 29, 3, 3), (1000, 999), (5, 7, 11)]
    scores = _scores(shapes, dtype, g)
    masks = _masks(shapes, g, 0.4)
    gpu = _cuda(scores)
    ops.density_decay_(gpu, _cuda(masks), 0.5)
    ops.density_decay_(scores, masks, 0.5)
    for a, c in zip(gpu, scores):
        torch.testing.assert_close(a.cpu(), c)
