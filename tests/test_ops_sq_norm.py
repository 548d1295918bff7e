"""masked_sq_norm: forward against the reference, autograd (first and second order), and the
Hutchinson Hessian-vector product through it against the same HVP through plain torch ops."""
import math

import pytest
import torch

import widetopo_ext as W
from widetopo_ext import reference as R

pytestmark = pytest.mark.needs_kernel("masked_sq_norm")

SHAPES = [(), (1,), (7,), (0,), (3, 4), (5, 3, 3, 3), (4, 0, 3), (2, 3, 1, 1)]
OUT_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
             torch.float16: torch.float32, torch.bfloat16: torch.float32}


@pytest.mark.parametrize("dtype", list(OUT_DTYPE))
@pytest.mark.parametrize("with_masks", [True, False])
def test_forward_against_reference(dtype, with_masks, gen):
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    masks = [torch.rand(s, generator=gen) < 0.4 for s in SHAPES] if with_masks else None
    out = W.masked_sq_norm(tensors, masks)
    ref = R.masked_sq_norm(tensors, masks)
    assert out.dim() == 0 and out.dtype == OUT_DTYPE[dtype]
    torch.testing.assert_close(out, ref, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)


def test_hand_computed_and_selection():
    t = [torch.tensor([[1.0, 2.0], [3.0, math.nan]]), torch.tensor([4.0, -1.0])]
    m = [torch.tensor([[True, False], [True, False]]), torch.tensor([True, True])]
    # 1 + 9 + 16 + 1 = 27; the pruned NaN and 2 contribute nothing.
    assert W.masked_sq_norm(t, m).item() == 27.0
    assert W.masked_sq_norm([torch.tensor([3.0, 4.0])]).item() == 25.0


def test_non_contiguous_and_many(gen):
    base = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    tensors = [base.t(), base[:, ::3], torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).permute(2, 0, 1)]
    masks = [(torch.rand(10, 6, generator=gen) < 0.5), (torch.rand(8, 6, generator=gen) < 0.5).t()[:, :4],
             torch.rand(2, 4, 3, generator=gen) < 0.5]
    torch.testing.assert_close(W.masked_sq_norm(tensors, masks), R.masked_sq_norm(tensors, masks))
    shapes = [(1 + j % 3, 1 + j % 5) for j in range(230)]
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    torch.testing.assert_close(W.masked_sq_norm(tensors, masks), R.masked_sq_norm(tensors, masks))


def test_backward_values_and_dtypes(gen):
    for dtype in OUT_DTYPE:
        t = [torch.randn(3, 4, generator=gen).to(dtype).requires_grad_(), torch.randn(5, generator=gen).to(dtype).requires_grad_()]
        m = [torch.rand(3, 4, generator=gen) < 0.5, torch.rand(5, generator=gen) < 0.5]
        W.masked_sq_norm(t, m).backward(torch.tensor(1.5, dtype=OUT_DTYPE[dtype]))
        for x, mm in zip(t, m):
            assert x.grad.dtype == dtype
            expected = torch.where(mm, 2 * 1.5 * x.detach().float(), 0.0).to(dtype)
            torch.testing.assert_close(x.grad, expected)
    # no masks: grad = 2 t
    x = torch.randn(4, generator=gen, requires_grad=True)
    W.masked_sq_norm([x]).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_gradcheck_and_gradgradcheck(gen):
    shapes = [(3, 2), (4,), (2, 1, 2)]
    t = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    m = [torch.rand(s, generator=gen) < 0.6 for s in shapes]
    fn = lambda *xs: W.masked_sq_norm(list(xs), m)
    assert torch.autograd.gradcheck(fn, t)
    assert torch.autograd.gradgradcheck(fn, t)
    fn_nomask = lambda *xs: W.masked_sq_norm(list(xs))
    assert torch.autograd.gradcheck(fn_nomask, t)
    assert torch.autograd.gradgradcheck(fn_nomask, t)


def _mlp_params(gen):
    return [torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)]


def _hutchinson_hvp(params, masks, x, v, sq_norm):
    """h = d/dθ ||g ⊙ m||^2 with g = d<v, f(x; θ⊙m)>/dθ  (docs/design.md §2.1, one probe)."""
    w1, b1, w2 = params
    f = torch.tanh(x @ (w1 * masks[0]).t() + b1) @ (w2 * masks[2]).t()
    g = torch.autograd.grad((v * f).sum(), params, create_graph=True)
    trace = sq_norm(list(g), masks)
    return trace, torch.autograd.grad(trace, params)


def test_hutchinson_hvp_matches_plain_torch(gen):
    params = _mlp_params(gen)
    masks = [torch.rand(6, 5, generator=gen) < 0.5, torch.ones(6, dtype=torch.bool), torch.rand(3, 6, generator=gen) < 0.5]
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    plain = lambda g, m: sum((gj * mj).pow(2).sum() for gj, mj in zip(g, m))
    t_op, h_op = _hutchinson_hvp(params, masks, x, v, W.masked_sq_norm)
    t_ref, h_ref = _hutchinson_hvp(params, masks, x, v, plain)
    torch.testing.assert_close(t_op, t_ref)
    for a, b in zip(h_op, h_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_requires_grad_only_when_inputs_do(gen):
    t = [torch.randn(3, generator=gen)]
    assert not W.masked_sq_norm(t).requires_grad
    t[0].requires_grad_()
    assert W.masked_sq_norm(t).requires_grad
    with torch.no_grad():
        assert not W.masked_sq_norm(t).requires_grad
