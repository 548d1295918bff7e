"""Twice-differentiable scoring forwards.

WideTopo's NTK-trace term (and GraSP's Hessian term) differentiates a gradient: every op of the
forward needs a backward that is itself differentiable. A few torch kernels lack that:

* F.scaled_dot_product_attention dispatches to fused kernels (flash / memory-efficient / the
  CPU flash kernel) whose backward has no derivative. nn.MultiheadAttention (need_weights=False)
  and nn.Transformer* call it through F.multi_head_attention_forward.
* F.hardsigmoid: aten::hardsigmoid_backward has no derivative (MobileNetV3's SE blocks).
* On CUDA, cuDNN's fused RNN kernels (nn.LSTM / GRU / RNN) have no double backward.

`twice_differentiable()` is a TorchFunctionMode that, while active, computes those ops with
plain differentiable torch ops and the same forward values (up to float rounding):

    sdpa(q, k, v) = softmax(q k^T * scale + mask) v      (explicit math, masks and GQA honoured)
    F.multi_head_attention_forward: its own explicit path (need_weights=True; weights dropped)
    hardsigmoid(x) = clamp(x + 3, 0, 6) / 6             (in place when asked)
    lstm / gru / rnn_tanh / rnn_relu on CUDA: cuDNN disabled (the native ATen composite)

ScoreContext.forward runs every scoring forward inside it. `check_double_backward(ctx, x)` is a
pre-flight for methods that need second derivatives: one small Hessian-vector product, and on
failure an error naming the innermost module whose double backward fails and what to do.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from widetopo.errors import DoubleBackwardError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "twice_differentiable",
    "TwiceDifferentiableMode",
    "sdpa_math",
    "hardsigmoid_math",
    "check_double_backward",
    "needs_double_backward",
    "DoubleBackwardError",
    "SUBSTITUTIONS",
]


# ---------------------------------------------------------------------------------------------
# substitutes


def sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask) v with plain torch ops (differentiable to any order).

    scale defaults to 1/sqrt(E); a bool attn_mask keeps True entries, a float one is added;
    is_causal keeps j <= i (top-left aligned, as torch does); enable_gqa repeats key/value heads
    to the query's head count. Rows whose every entry is masked give 0 (as torch's math kernel
    does) instead of NaN. dropout_p > 0 applies dropout to the attention weights, as torch does.
    """
    length, source = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    if enable_gqa and key.dim() >= 3 and query.size(-3) != key.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    logits = torch.matmul(query, key.transpose(-2, -1)) * scale
    masked = None
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        masked = ~keep
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = ~attn_mask if masked is None else masked | ~attn_mask
        else:
            logits = logits + attn_mask
    if masked is not None:
        logits = logits.masked_fill(masked, float("-inf"))
    dead = None
    if masked is not None or (attn_mask is not None and attn_mask.dtype != torch.bool):
        dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
        logits = logits.masked_fill(dead, 0.0)
    weights = torch.softmax(logits, dim=-1)
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return torch.matmul(weights, value)


def hardsigmoid_math(input, inplace=False):
    """clamp(x + 3, 0, 6) / 6 (= relu6(x + 3) / 6); inplace=True writes it into `input` (with
    copy_, which autograd records), as torch's in-place kernel would: code like
    `x * F.hardsigmoid(x, inplace=True)` keeps its meaning."""
    out = torch.clamp(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


def _rnn_without_cudnn(func, args, kwargs):
    """cuDNN's RNN kernels have no double backward: run the native composite on CUDA."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.is_cuda for t in tensors):
        with torch.backends.cudnn.flags(enabled=False):
            return func(*args, **kwargs)
    return func(*args, **kwargs)


def _sdpa(func, args, kwargs):
    return sdpa_math(*args, **kwargs)


def _hardsigmoid(func, args, kwargs):
    if func is torch._C._nn.hardsigmoid_:
        return hardsigmoid_math(*args, inplace=True)
    return hardsigmoid_math(*args, **kwargs)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _mha(func, args, kwargs):
    """F.multi_head_attention_forward with need_weights=True: its explicit bmm/softmax path
    instead of the fused kernel (torch runs a mode's __torch_function__ with the mode switched
    off, so the SDPA call inside this Python function would not be seen). The weights are
    dropped again when they were not asked for."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    wanted = bound.arguments.get("need_weights", True)
    bound.arguments["need_weights"] = True
    out, weights = func(*bound.args, **bound.kwargs)
    return out, (weights if wanted else None)


def _substitutions() -> Dict[object, object]:
    table = {
        F.multi_head_attention_forward: _mha,
        F.scaled_dot_product_attention: _sdpa,
        torch._C._nn.scaled_dot_product_attention: _sdpa,
        F.hardsigmoid: _hardsigmoid,
        torch._C._nn.hardsigmoid: _hardsigmoid,
        torch._C._nn.hardsigmoid_: _hardsigmoid,
    }
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        fn = getattr(torch, name, None)
        if fn is not None:
            table[fn] = _rnn_without_cudnn
    return table


#: callable -> replacement(func, args, kwargs) used while twice_differentiable() is active
SUBSTITUTIONS = _substitutions()


class TwiceDifferentiableMode(TorchFunctionMode):
    """Routes the ops of SUBSTITUTIONS through twice-differentiable equivalents."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = SUBSTITUTIONS.get(func)
        if replacement is not None:
            return replacement(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """While inside, attention, hardsigmoid and (CUDA) RNNs run as twice-differentiable math
    with the same forward values. Re-entrant (an inner use is a no-op)."""
    if any(isinstance(m, TwiceDifferentiableMode) for m in _active_modes()):
        yield
        return
    with TwiceDifferentiableMode():
        yield


def _active_modes() -> List[object]:
    try:
        from torch.overrides import _get_current_function_mode_stack

        return list(_get_current_function_mode_stack())
    except ImportError:  # pragma: no cover - older torch
        return []


# ---------------------------------------------------------------------------------------------
# pre-flight


def needs_double_backward(scorer) -> bool:
    """The scorer's own declaration (Scorer.needs_double_backward; WideTopo: mu1 != 0)."""
    return bool(getattr(scorer, "needs_double_backward", False))


_NOT_IMPLEMENTED = re.compile(r"(derivative for \S+ is not implemented|double backward|once_differentiable)",
                              re.IGNORECASE)


def _is_missing_derivative(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(_NOT_IMPLEMENTED.search(str(exc)))


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def _hvp(outputs: List[torch.Tensor], leaves: List[torch.Tensor]) -> None:
    """g = d<v, out>/d leaves (v = 1, graph kept), t = ||g||^2, then dt/d leaves: raises where a
    backward has no derivative. Nothing is accumulated into .grad."""
    outputs = [o for o in outputs if o.requires_grad]
    if not outputs or not leaves:
        return
    grads = torch.autograd.grad(
        outputs, leaves, grad_outputs=[torch.ones_like(o) for o in outputs],
        create_graph=True, allow_unused=True,
    )
    terms = [g.pow(2).sum() for g in grads if g is not None and g.requires_grad]
    if terms:
        torch.autograd.grad(sum(terms), leaves, allow_unused=True)


def _sub(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of a model-level name -> tensor dict that belong to submodule `prefix`."""
    if not prefix:
        return dict(tensors)
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def _module_fails(module: nn.Module, prefix: str, params, buffers, args, kwargs) -> bool:
    """Replay one module alone (the context's tensors, on copies of its recorded inputs): does
    its own double backward hit a missing derivative?"""
    inputs = [a.detach().requires_grad_(True) if _floating(a) else a for a in args]
    kw = {k: (v.detach().requires_grad_(True) if _floating(v) else v) for k, v in kwargs.items()}
    own = {k: (v.detach().requires_grad_(True) if _floating(v) else v) for k, v in _sub(params, prefix).items()}
    leaves = [a for a in inputs if _floating(a)] + [v for v in kw.values() if _floating(v)]
    leaves += [v for v in own.values() if _floating(v)]
    try:
        with twice_differentiable(), torch.enable_grad():
            out = functional_call(module, (own, _sub(buffers, prefix)), tuple(inputs), kw)
            _hvp(_flatten(out), leaves)
    except Exception as exc:  # noqa: BLE001 - only missing derivatives count
        return _is_missing_derivative(exc)
    return False


def _locate(model: nn.Module, run, params, buffers) -> Tuple[Optional[str], Optional[nn.Module]]:
    """The innermost module whose own double backward fails (recorded inputs replayed)."""
    calls: List[Tuple[str, nn.Module, tuple, dict]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module, args, kwargs):
        calls.append((names.get(id(module), "?"), module, tuple(args), dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.enable_grad():  # the same code paths as the failing forward (fast paths off)
            run()
    except Exception:  # noqa: BLE001 - the forward itself worked before; best effort only
        pass
    finally:
        for h in handles:
            h.remove()
    failing = [(n, m) for n, m, a, k in calls if m is not model and _module_fails(m, n, params, buffers, a, k)]
    if not failing:
        return None, None
    # innermost: a failing module none of whose failing descendants is listed
    for name, module in failing:
        if not any(other is not module and other_name.startswith(name + ".") for other_name, other in failing):
            return name, module
    return failing[0]


def check_double_backward(ctx, x: torch.Tensor, method: str = "this method", samples: int = 2) -> None:
    """Pre-flight for methods that need second derivatives (WideTopo's NTK term, GraSP).

    Runs f(x[:samples]) through ctx.forward (eval mode, BatchNorm as its affine map, the
    twice-differentiable substitutes active), g = grad of sum f w.r.t. every floating parameter
    with the graph kept, and the gradient of ||g||^2. If torch lacks a second derivative of some
    op, raises DoubleBackwardError naming the innermost module that fails on its own and what to
    do. Leaves ctx (params, buffers, model) unchanged.
    """
    from widetopo.scores.bn import affine_batchnorm, eval_mode

    from widetopo.scores.inputs import head

    x = head(x, samples).to(ctx.device)
    params = {n: (p.detach().requires_grad_(True) if p.is_floating_point() else p.detach())
              for n, p in ctx.params.items()}
    leaves = [p for p in params.values() if p.requires_grad]
    model = ctx.model
    with eval_mode(model), affine_batchnorm(model):
        try:
            with torch.enable_grad():
                _hvp(_flatten(ctx.forward(params, x)), leaves)
            return
        except Exception as exc:  # noqa: BLE001
            if not _is_missing_derivative(exc):
                raise
            error = exc
        name, module = _locate(model, lambda: ctx.forward(params, x), params, ctx.buffers)
    detail = str(error).splitlines()[0].rstrip(".")
    if name is None:
        where = f"an op called directly in the forward() of the model ({type(model).__name__})"
    else:
        where = f"module {name!r} ({type(module).__name__})"
    raise DoubleBackwardError(
        f"{method} needs second derivatives (a Hessian-vector product), but {where} has none in "
        f"torch: {detail}. Replace that op by a twice-differentiable equivalent (e.g. "
        "clamp/softmax math; widetopo already substitutes F.scaled_dot_product_attention, "
        "F.hardsigmoid and cuDNN RNNs), or use a first-order method (snip, synflow, magnitude, "
        "random), or WideTopo with mu1=0 (ITA term only)."
    ) from error
