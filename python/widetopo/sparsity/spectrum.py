"""The empirical NTK spectrum of a masked network (docs/design.md §7, both papers' figure).

For inputs x_1..x_n and a network whose prunable weights are used as θ⊙m,

    Θ = J Jᵀ,   J[(i, c), :] = m ⊙ ∂f_c(x_i; θ⊙m) / ∂θ      (an N × N matrix, N = n · outputs)

rows ordered sample-major: index i · d + c for sample i and output c (d outputs per sample:
every logit, or their sum). The gradient is taken with respect to the selected parameters
(the prunable set by default, every floating parameter with parameters="all"); entries of a
masked tensor that are pruned get a zero gradient (the factor m), the others are unmasked.
Everything runs in float64 (J's rounding in float32, ≈ √n·ε·λ_max, hides the smallest
eigenvalues), and J is never stored whole:

* full   Θ block by block: rows of J for a block of samples by per-sample VJPs
         (vmapped over the sample's outputs), Θ_ab = R_a R_bᵀ, two blocks in memory at a time
         (blocks after the first are recomputed: 1 + B(B-1)/2 block passes for B blocks); then
         torch.linalg.eigvalsh. (Columns Θ e_j = J(m ⊙ J_jᵀ) by one JVP each cost one
         forward-mode pass over *all* n samples per column: ~20x slower on ResNet-20, from the
         measured cost of one vmapped JVP.)
* topk   block Lanczos (block Krylov with full reorthogonalisation and Rayleigh-Ritz) on
         V ↦ Θ V = J(m ⊙ Jᵀ V): one batched VJP then one batched JVP per step. The block
         (default k vectors) also finds eigenvalues repeated up to k times, which per-logit
         NTKs have (Θ ≈ K ⊗ I for independent logits). A block product costs about 2.5 J-row
         passes per vector, so for N up to a few thousand "full" is faster (ResNet-20, N = 1000,
         k = 10: ~5x); top-k pays when Θ (N² memory, N²·P Gram) is what does not fit.
* trace  exactly, Σ_rows ‖J_row‖², or by Hutchinson, E‖m ⊙ Jᵀv‖² for Rademacher v.

BatchNorm: "eval" uses the running statistics (samples independent, so rows are computed per
sample); "train" normalises with the statistics of all inputs together (the WideTopo figure),
which couples the samples, so every VJP/JVP runs over all n samples. The caller's model is not
changed (parameters, buffers, train/eval flags, requires_grad), nor is the global RNG: the
Lanczos start and the Hutchinson probes come from a generator seeded by `seed`.

Inputs (docs/design.md §2.5): a tensor (n, ...), fed as model(x), or a dict of keyword inputs
(a Hugging Face batch: input_ids, attention_mask, pixel_values, ...), fed as model(**inputs).
In a dict every tensor of dimension >= 1 is split into samples along dim 0 (all must have the
same leading size n); 0-dim tensors and non-tensor values (use_cache=False, a scale) are passed
unchanged to every call; targets under "labels", "targets", "target" or "y" are taken out, as
widetopo.prune does (the NTK differentiates the outputs, not a loss; two of them are refused).
Floating inputs are cast to `dtype`, integer ones (token ids, masks) are used as they are:
J is with respect to the parameters only. The output may be the logits, a ModelOutput / dict
with "logits", or a tuple starting with them; the logits' dim 0 is the sample dimension and
the other dimensions are flattened (d = L · vocab for a language model's (n, L, vocab) logits).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.func import jvp, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from widetopo.constants import TARGET_KEYS
from widetopo.errors import UnsupportedInputsError
from widetopo.scores.inputs import Inputs, ModelInput, call_model, cast_floating, logits_of, num_samples

logger = logging.getLogger(__name__)

__all__ = ["ntk_spectrum", "ntk_matrix", "spectrum_report", "MODES", "OUTPUTS", "BATCHNORM"]

MODES = ("full", "topk", "trace")
OUTPUTS = ("per_logit", "sum")
BATCHNORM = ("eval", "train")


# ----------------------------------------------------------------------------- validation

def _int_arg(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _choice(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def _selected_names(model: nn.Module, parameters) -> List[str]:
    """The parameters J differentiates: "prunable" (select_prunable), "all" (every floating
    parameter) or an explicit list of names."""
    from widetopo.sparsity.selection import select_prunable

    if isinstance(parameters, str):
        if parameters == "prunable":
            return select_prunable(model)
        if parameters == "all":
            names = [n for n, p in model.named_parameters() if p.is_floating_point()]
            if not names:
                raise ValueError("parameters='all': the model has no floating-point parameters")
            return names
        raise ValueError(f"parameters must be 'prunable', 'all' or a list of parameter names; got {parameters!r}")
    if not isinstance(parameters, Sequence):
        raise ValueError(f"parameters must be 'prunable', 'all' or a list of parameter names; got {parameters!r}")
    names = select_prunable(model, names=list(parameters))
    params = dict(model.named_parameters())
    bad = [n for n in names if not params[n].is_floating_point()]
    if bad:
        raise ValueError(f"parameters: {bad} are not floating-point parameters")
    return names


def _check_masks(model: nn.Module, masks, names: List[str]) -> Dict[str, torch.Tensor]:
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be None or a mapping name -> bool tensor (e.g. widetopo.Masks), "
                        f"got {type(masks).__name__}")
    params = dict(model.named_parameters())
    selected = set(names)
    out = {}
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a torch.bool tensor, got {getattr(m, 'dtype', type(m).__name__)}")
        if name not in params:
            raise ValueError(f"masks[{name!r}]: the model has no parameter of that name")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
        if name not in selected:
            raise ValueError(f"masks[{name!r}] is not among the parameters the NTK differentiates "
                             f"({len(names)} selected); pass parameters='all' or a list that includes it")
        out[name] = m
    return out


def _check_inputs(inputs) -> ModelInput:
    """The samples as the model takes them: a tensor (n, ...), fed as model(x), or a dict of
    keyword inputs, fed as model(**inputs) (module docstring: which values are split into
    samples, which are passed through, and the targets taken out). Checked before any work."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(f"inputs must have a leading sample dimension with at least one sample, got shape "
                             f"{tuple(inputs.shape)}")
        if inputs.is_complex() or inputs.dtype == torch.bool:
            raise TypeError(f"inputs must be real (floating point, or integer token ids), got {inputs.dtype}")
        return inputs
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a tensor of samples (n, ...) or a dict of keyword inputs fed as "
                        f"model(**inputs) (e.g. input_ids, attention_mask), got {type(inputs).__name__}")
    bad = [k for k in inputs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"inputs: the keys of a dict of keyword inputs must be strings, got {bad!r}")
    targets = [k for k in TARGET_KEYS if k in inputs]
    if len(targets) > 1:
        raise ValueError(f"inputs holds targets under several keys {targets}; the NTK needs no targets: pass at "
                         f"most one of {list(TARGET_KEYS)} (it is taken out, as widetopo.prune does), or none")
    if targets:
        logger.info("ntk_spectrum: inputs[%r] taken out (targets: the NTK differentiates the outputs, no loss)",
                    targets[0])
    x = Inputs((k, v) for k, v in inputs.items() if k not in targets)
    sizes = {k: int(v.shape[0]) for k, v in x.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError(f"inputs: the dict holds no tensor with a sample dimension (keys {sorted(inputs)}"
                         f"{', targets taken out' if targets else ''}); give the model's inputs as tensors (n, ...)")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs: every tensor of a dict (0-dim ones excepted) is split into samples along dim 0, "
                         f"so all must have the same leading size; got {sizes}. Expand a tensor shared by all "
                         f"samples to (n, ...)")
    complex_ = [k for k, v in x.items() if isinstance(v, torch.Tensor) and v.is_complex()]
    if complex_:
        raise TypeError(f"inputs: {complex_} are complex tensors; the inputs must be real")
    if next(iter(sizes.values())) < 1:
        raise ValueError(f"inputs must hold at least one sample, got leading sizes {sizes}")
    return x


def _samples(x: ModelInput, start: int, stop: int) -> ModelInput:
    """Samples start..stop-1: rows of the tensor, or of every dict tensor of dimension >= 1;
    0-dim tensors and non-tensor values are passed through."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return Inputs((k, v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in x.items())


# ----------------------------------------------------------------------------- the problem

@contextlib.contextmanager
def _modes(model: nn.Module, batchnorm: str):
    """Every module in eval mode (dropout off); with batchnorm="train", BatchNorm in train mode
    with track_running_stats off (batch statistics, and no write to the running buffers, which
    torch.func transforms forbid). Flags restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        model.eval()
        if batchnorm == "train":
            for m, _ in tracking:
                m.train()
                m.track_running_stats = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        for m, flag in tracking:
            m.track_running_stats = flag


class _NTK:
    """The masked network as a function of the selected parameters, with J's products.

    `independent`: every sample's outputs depend on that sample only (BatchNorm from running
    statistics), so rows and products are computed per chunk of samples."""

    def __init__(self, model, x, names, masks, outputs, batchnorm, dtype, chunk_size):
        from widetopo.scores.bn import uses_batch_statistics

        self.model, self.names, self.outputs, self.chunk = model, names, outputs, chunk_size
        device = next(iter(model.parameters())).device
        params = dict(model.named_parameters())
        self.fixed = {n: (p.detach().to(device=device, dtype=dtype) if p.is_floating_point() else p.detach())
                      for n, p in params.items()}
        self.buffers = {n: (b.detach().to(dtype=dtype).clone() if b.is_floating_point() else b.detach().clone())
                        for n, b in model.named_buffers()}
        self.m = [None if n not in masks else masks[n].to(device=device, dtype=dtype) for n in names]
        self.u = tuple(self.fixed[n] if mk is None else self.fixed[n] * mk for n, mk in zip(names, self.m))
        for n in names:
            del self.fixed[n]
        self.x = cast_floating(x, dtype).to(device)  # floating inputs in dtype, token ids / masks as they are
        self.n = num_samples(x)
        self.independent = batchnorm == "eval" and not uses_batch_statistics(model)
        with torch.no_grad():
            out = self._f(self.u, _samples(self.x, 0, 1) if self.independent else self.x)
        self.d = out.shape[1]
        self.N = self.n * self.d
        self.numel = [t.numel() for t in self.u]
        self.P = sum(self.numel)
        self.m_flat = [None if mk is None else mk.reshape(-1) for mk in self.m]
        # vectors per vmapped call: all of them over chunk_size samples (independent samples),
        # else so many that vectors x n samples stays near 8 * chunk_size sample passes
        self.group = None if self.independent else max(1, 8 * chunk_size // self.n)

    def _groups(self, b: int):
        step = b if self.group is None else self.group
        return [(a, min(a + step, b)) for a in range(0, b, step)]

    def _f(self, u, x) -> torch.Tensor:
        """Outputs (b, d) of the masked network: every logit, or their sum. The model's output
        may be the logits, a ModelOutput / dict with "logits", or a tuple starting with them."""
        tensors = {**self.fixed, **dict(zip(self.names, u)), **self.buffers}
        b = num_samples(x)
        raw = call_model(self.model, tensors, x)
        try:
            out = logits_of(raw)
        except UnsupportedInputsError:
            raise TypeError("the model must return its logits: a tensor, a ModelOutput/dict with 'logits' or a tuple "
                            f"whose first element is the logits, got {type(raw).__name__}") from None
        if out.dim() < 1 or out.shape[0] != b:
            raise TypeError(f"the model's logits must have the sample dimension first ({b} samples), got shape "
                            f"{tuple(out.shape)}")
        out = out.reshape(b, -1)
        return out.sum(1, keepdim=True) if self.outputs == "sum" else out

    def _chunks(self):
        """(start, stop) sample ranges processed together."""
        if not self.independent:
            return [(0, self.n)]
        return [(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]

    def _masked(self, grads) -> List[torch.Tensor]:
        return [g if mk is None else g * mk for g, mk in zip(grads, self.m)]

    def rows(self, start: int, stop: int) -> List[torch.Tensor]:
        """Rows of J for samples start..stop-1 (sample-major), one (rows, numel) tensor per
        parameter. Independent samples: one forward per sample and a VJP vmapped over its d
        outputs (measured faster than vmapping jacrev over samples); coupled samples: a forward
        over all inputs and VJPs vmapped over chunks of one-hot cotangents."""
        dtype, device = self.u[0].dtype, self.u[0].device
        out = [torch.empty((stop - start) * self.d, k, dtype=dtype, device=device) for k in self.numel]
        if self.independent:
            eye = torch.eye(self.d, dtype=dtype, device=device)
            for i in range(start, stop):
                _, fn = vjp(lambda u: self._f(u, _samples(self.x, i, i + 1)).reshape(-1), self.u)
                grads = vmap(fn)(eye)[0]
                r = (i - start) * self.d
                for o, g in zip(out, grads):
                    o[r:r + self.d] = g.reshape(self.d, -1)
        else:
            _, fn = vjp(lambda u: self._f(u, self.x).reshape(-1), self.u)
            step = self.group
            for a in range(start * self.d, stop * self.d, step):
                b = min(a + step, stop * self.d)
                basis = torch.zeros(b - a, self.N, dtype=dtype, device=device)
                basis[torch.arange(b - a), torch.arange(a, b)] = 1
                grads = vmap(fn)(basis)[0]
                r = a - start * self.d
                for o, g in zip(out, grads):
                    o[r:r + b - a] = g.reshape(b - a, -1)
        for o, mk in zip(out, self.m_flat):
            if mk is not None:
                o.mul_(mk)
        return out

    def vjp(self, V: torch.Tensor) -> List[torch.Tensor]:
        """m ⊙ Jᵀ V for V of shape (N, b): one (b, *shape) tensor per parameter."""
        total = None
        for s, t in self._chunks():
            _, fn = vjp(lambda u: self._f(u, _samples(self.x, s, t)).reshape(-1), self.u)
            Vt = V[s * self.d:t * self.d].T.contiguous()
            parts = [vmap(fn)(Vt[a:b])[0] for a, b in self._groups(Vt.shape[0])]
            grads = [torch.cat(g) if len(parts) > 1 else g[0] for g in zip(*parts)]
            total = list(grads) if total is None else [a + g for a, g in zip(total, grads)]
        return self._masked(total)

    def jvp(self, G: List[torch.Tensor]) -> torch.Tensor:
        """J G for tangents G (b, *shape) per parameter: (N, b)."""
        cols = []
        for s, t in self._chunks():
            xs = _samples(self.x, s, t)
            one = lambda *tangent: jvp(lambda *u: self._f(u, xs).reshape(-1), self.u, tangent)[1]  # noqa: E731
            parts = [vmap(one)(*[g[a:b] for g in G]) for a, b in self._groups(G[0].shape[0])]
            cols.append(torch.cat(parts) if len(parts) > 1 else parts[0])  # (b, rows)
        return torch.cat(cols, dim=1).T

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Θ V = J (m ⊙ Jᵀ V)."""
        return self.jvp(self.vjp(V))


def _gram(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    out = a[0] @ b[0].T
    for x, y in zip(a[1:], b[1:]):
        out.addmm_(x, y.T)
    return out


def _full_matrix(p: _NTK, max_block_bytes: int) -> torch.Tensor:
    """Θ from blocks of rows of J; a block holds `per` samples (≥ 1) within max_block_bytes."""
    bytes_per_sample = p.d * p.P * p.u[0].element_size()
    per = max(1, int(max_block_bytes // max(1, bytes_per_sample)))
    if not p.independent:
        per = min(per, p.n)
    blocks = [(s, min(s + per, p.n)) for s in range(0, p.n, per)]
    logger.info("NTK %d x %d over %d parameters: %d block(s) of <= %d samples", p.N, p.N, p.P, len(blocks), per)
    theta = torch.empty(p.N, p.N, dtype=p.u[0].dtype, device=p.u[0].device)
    rows_a = p.rows(*blocks[0])
    for ia, (sa, ta) in enumerate(blocks):
        ra = slice(sa * p.d, ta * p.d)
        g = _gram(rows_a, rows_a)
        theta[ra, ra] = (g + g.T) / 2
        nxt = None
        for ib in range(len(blocks) - 1, ia, -1):  # backwards: the last one is the next block a
            sb, tb = blocks[ib]
            rows_b = p.rows(sb, tb)
            g = _gram(rows_a, rows_b)
            theta[ra, sb * p.d:tb * p.d] = g
            theta[sb * p.d:tb * p.d, ra] = g.T
            nxt = rows_b
        rows_a = nxt
    return theta


def _orthonormal_block(W: torch.Tensor, basis: Optional[torch.Tensor], gen, width: int) -> torch.Tensor:
    """`width` orthonormal columns spanning W's part orthogonal to `basis`; directions W lacks
    (deflation: an invariant subspace was found) are filled with random vectors."""
    def project(M):
        if basis is not None:
            for _ in range(2):  # twice is enough (Giraud et al.)
                M = M - basis @ (basis.T @ M)
        return M

    scale = max(float(W.norm()), torch.finfo(W.dtype).tiny)
    W = project(W)
    keep = W.norm(dim=0) > 1e-10 * scale
    W = W[:, keep]
    cols = []
    if W.shape[1]:
        Q, R = torch.linalg.qr(W)
        good = R.diagonal().abs() > 1e-10 * max(float(R.diagonal().abs().max()), torch.finfo(W.dtype).tiny)
        cols = [Q[:, good]]
    have = sum(c.shape[1] for c in cols)
    while have < width:
        extra = torch.randn(W.shape[0], width - have, generator=gen, dtype=W.dtype).to(W.device)
        known = ([basis] if basis is not None else []) + cols
        if known:
            full = torch.cat(known, dim=1)
            for _ in range(2):
                extra = extra - full @ (full.T @ extra)
        Q, R = torch.linalg.qr(extra)
        good = R.diagonal().abs() > 1e-8 * math.sqrt(W.shape[0])
        cols.append(Q[:, good])
        have += int(good.sum())
    return torch.cat(cols, dim=1)[:, :width]


def _lanczos_topk(matvec, N: int, k: int, block: int, tol: float, max_iter: int, gen, dtype, device) -> torch.Tensor:
    """The k largest eigenvalues of the symmetric PSD operator `matvec` (N × N), by block
    Lanczos with full reorthogonalisation: basis V, images A V kept, Ritz values of Vᵀ A V;
    stop when every top-k residual ‖A y − θ y‖ <= tol · θ_1 (then |θ − λ| <= that residual)."""
    basis = _orthonormal_block(torch.randn(N, block, generator=gen, dtype=dtype).to(device), None, gen, block)
    images = matvec(basis)
    for step in range(1, max_iter + 1):
        T = basis.T @ images
        T = (T + T.T) / 2
        theta, Y = torch.linalg.eigh(T)
        theta, Y = theta.flip(0), Y.flip(1)
        m = basis.shape[1]
        if m >= k:
            Yk = Y[:, :k]
            res = (images @ Yk - basis @ Yk * theta[:k]).norm(dim=0)
            bound = tol * max(abs(float(theta[0])), torch.finfo(dtype).tiny)
            logger.debug("lanczos step %d: basis %d, max residual %.3g (bound %.3g)", step, m, float(res.max()), bound)
            if m >= N or bool((res <= bound).all()):
                logger.info("lanczos: top-%d of %d converged with a basis of %d after %d block products", k, N, m, step)
                return theta[:k]
        width = min(block, N - m)
        new = _orthonormal_block(images[:, -block:] if m >= block else images, basis, gen, width)
        basis = torch.cat([basis, new], dim=1)
        images = torch.cat([images, matvec(new)], dim=1)
    raise RuntimeError(f"ntk_spectrum(mode='topk'): Lanczos did not converge to tol={tol:g} within max_iter={max_iter} "
                       f"block products (basis {basis.shape[1]} of {N}); raise max_iter or tol, or use mode='full'")


# ----------------------------------------------------------------------------- public API

def _prepare(model, inputs, masks, outputs, batchnorm, parameters, dtype, chunk_size):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(iter(model.parameters()), None) is None:
        raise ValueError("model has no parameters")
    inputs = _check_inputs(inputs)
    _choice("outputs", outputs, OUTPUTS)
    _choice("batchnorm", batchnorm, BATCHNORM)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 (default) or torch.float32, got {dtype!r}")
    _int_arg("chunk_size", chunk_size, 1)
    names = _selected_names(model, parameters)
    masks = _check_masks(model, masks, names)
    if batchnorm == "train" and num_samples(inputs) < 2 and any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError("batchnorm='train' normalises with the statistics of the inputs: pass at least 2 samples")
    return inputs, names, masks


@contextlib.contextmanager
def _untouched(model, batchnorm):
    """Model flags restored and the global RNG state kept (fork_rng) around the computation.
    scaled_dot_product_attention (Hugging Face models' default attention) runs its math backend:
    the fused CPU/CUDA kernels have no forward-mode AD (the JVPs of "topk") nor vmap rules for
    their backward, and no float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), _modes(model, batchnorm), torch.enable_grad(), \
            sdpa_kernel(SDPBackend.MATH):
        yield


def ntk_matrix(model: nn.Module, inputs: Union[torch.Tensor, Mapping], masks=None, *, outputs: str = "per_logit",
               batchnorm: str = "eval", parameters: Union[str, Sequence[str]] = "prunable",
               dtype: torch.dtype = torch.float64, chunk_size: int = 8,
               max_block_bytes: int = 256 * 2 ** 20) -> torch.Tensor:
    """The empirical NTK Θ = J Jᵀ of the masked network (N × N, rows sample-major, i·d + c),
    built from blocks of rows of J of at most max_block_bytes each (module docstring)."""
    inputs, names, masks = _prepare(model, inputs, masks, outputs, batchnorm, parameters, dtype, chunk_size)
    _int_arg("max_block_bytes", max_block_bytes, 1)
    with _untouched(model, batchnorm):
        p = _NTK(model, inputs, names, masks, outputs, batchnorm, dtype, chunk_size)
        return _full_matrix(p, max_block_bytes).cpu()


def ntk_spectrum(model: nn.Module, inputs: Union[torch.Tensor, Mapping], masks=None, *, outputs: str = "per_logit",
                 mode: str = "full", k: Optional[int] = None, batchnorm: str = "eval",
                 parameters: Union[str, Sequence[str]] = "prunable", probes: Optional[int] = None,
                 seed: int = 0, tol: float = 1e-8, max_iter: int = 200, block_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float64, chunk_size: int = 8,
                 max_block_bytes: int = 256 * 2 ** 20) -> torch.Tensor:
    """Eigenvalues of the empirical NTK Θ = J Jᵀ of `model` under `masks` on `inputs`
    (descending, float64, on the CPU), without storing J whole.

    inputs      a tensor (n, ...), or a dict of keyword inputs fed as model(**inputs): tensors
                of dimension >= 1 split along dim 0, other values passed through, targets
                ("labels", ...) taken out (module docstring)
    masks       None (dense) or name -> bool tensor; a masked parameter is used as θ⊙m and its
                pruned entries get no gradient; selected parameters without a mask are dense
    outputs     "per_logit": every output entry of every sample (N = n · outputs per sample);
                "sum": one output per sample, the sum of its outputs (N = n)
    mode        "full": all N eigenvalues (Θ block by block, then eigvalsh);
                "topk": the k largest, by block Lanczos (block_size vectors, default k; residual
                ‖Θy − θy‖ <= tol · θ_1, at most max_iter block products);
                "trace": a 0-dim tensor, tr Θ = Σ_rows ‖J_row‖² exactly, or, with probes=p,
                the Hutchinson mean of ‖m ⊙ Jᵀv‖² over p Rademacher vectors v
    batchnorm   "eval": running statistics; "train": the statistics of all inputs (coupled)
    parameters  "prunable" (widetopo.select_prunable), "all" (every floating parameter) or names
    seed        seeds the Lanczos start block and the Hutchinson probes (own generator)
    dtype       float64 (default) or float32 for the whole computation
    chunk_size  samples per vmapped VJP/JVP call (activation memory); with coupled samples
                (batchnorm="train") every call runs over all n samples and vmaps over
                max(1, 8·chunk_size // n) vectors
    max_block_bytes  memory of one block of rows of J in mode "full" (two are held)
    """
    _choice("mode", mode, MODES)
    if mode == "topk":
        _int_arg("k", k, 1)
        _int_arg("block_size", block_size, 1, allow_none=True)
        _int_arg("max_iter", max_iter, 1)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    elif k is not None or block_size is not None:
        raise ValueError(f"k and block_size are only used with mode='topk' (mode={mode!r}); leave them None")
    if mode == "trace":
        _int_arg("probes", probes, 1, allow_none=True)
    elif probes is not None:
        raise ValueError(f"probes is only used with mode='trace' (Hutchinson); got probes={probes!r} with mode={mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _int_arg("max_block_bytes", max_block_bytes, 1)
    inputs, names, masks = _prepare(model, inputs, masks, outputs, batchnorm, parameters, dtype, chunk_size)

    with _untouched(model, batchnorm):
        p = _NTK(model, inputs, names, masks, outputs, batchnorm, dtype, chunk_size)
        if mode == "topk" and k > p.N:
            raise ValueError(f"k must be at most N = {p.N} (samples x outputs), got {k}")
        gen = torch.Generator().manual_seed(seed)
        if mode == "full":
            theta = _full_matrix(p, max_block_bytes)
            return torch.linalg.eigvalsh(theta).flip(0).to("cpu", torch.float64)
        if mode == "topk":
            block = min(block_size or k, p.N)
            vals = _lanczos_topk(p.matvec, p.N, k, block, float(tol), max_iter, gen, p.u[0].dtype, p.u[0].device)
            return vals.to("cpu", torch.float64)
        if probes is None:
            total = torch.zeros((), dtype=torch.float64)
            for s, t in [(s, min(s + p.chunk, p.n)) for s in range(0, p.n, p.chunk)]:
                total += sum(float(r.square().sum()) for r in p.rows(s, t))
            return total
        acc = torch.zeros((), dtype=torch.float64)
        for a in range(0, probes, p.chunk):
            b = min(p.chunk, probes - a)
            v = (torch.randint(0, 2, (p.N, b), generator=gen) * 2 - 1).to(device=p.u[0].device, dtype=p.u[0].dtype)
            acc += sum(float(g.square().sum()) for g in p.vjp(v))
        return acc / probes


# ----------------------------------------------------------------------------- report (CLI)

def spectrum_report(model: nn.Module, inputs: Union[torch.Tensor, Mapping], masks_by_label: Mapping, out_path, *,
                    mode: str = "full", k: Optional[int] = None, outputs: str = "per_logit",
                    batchnorm: str = "eval", parameters: Union[str, Sequence[str]] = "prunable",
                    seed: int = 0, info: Optional[dict] = None, **options) -> dict:
    """Spectra of `model` under each entry of masks_by_label (label -> masks, None = dense) on
    the same inputs; writes out_path (PNG: sorted eigenvalues on a log axis; positive ones
    only, the count of the others is in the JSON), and next to it <stem>.csv (one column per
    label, rank by rank) and <stem>.json (eigenvalues, trace, density, options, `info`).
    Returns the JSON object. mode "full" or "topk"; options go to ntk_spectrum."""
    _choice("mode", mode, ("full", "topk"))
    if not isinstance(masks_by_label, Mapping) or not masks_by_label:
        raise ValueError("masks_by_label must be a non-empty mapping label -> masks (None for the dense network)")
    bad = [lab for lab in masks_by_label if not isinstance(lab, str) or not lab]
    if bad:
        raise ValueError(f"masks_by_label: labels must be non-empty strings, got {bad!r}")
    out_path = os.fspath(out_path)
    if not out_path.lower().endswith(".png"):
        raise ValueError(f"out_path must name a .png file, got {out_path!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the spectrum plot needs matplotlib: pip install matplotlib (or widetopo[plot])") from None
    names = _selected_names(model, parameters)
    for label, masks in masks_by_label.items():  # every argument checked before any work
        _check_masks(model, masks, names)
    inputs = _check_inputs(inputs)
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise ValueError(f"out_path: directory {parent!r} does not exist")
    stem = os.path.splitext(out_path)[0]
    kw = dict(outputs=outputs, batchnorm=batchnorm, parameters=parameters, seed=seed, **options)
    result = {"mode": mode, "k": k, "outputs": outputs, "batchnorm": batchnorm,
              "parameters": parameters if isinstance(parameters, str) else list(parameters),
              "samples": num_samples(inputs), "info": dict(info or {}), "spectra": {}}
    for label, masks in masks_by_label.items():
        vals = ntk_spectrum(model, inputs, masks, mode=mode, k=k, **kw)
        density = None
        if masks:
            kept = sum(int(m.sum()) for m in masks.values())
            density = kept / max(1, sum(m.numel() for m in masks.values()))
        result["spectra"][label] = {
            "density": density, "method": (getattr(masks, "meta", None) or {}).get("method"),
            "eigenvalues": vals.tolist(),
            "trace": float(vals.sum()) if mode == "full" else None,
            "nonpositive": int((vals <= 0).sum()),
        }
        logger.info("%s: largest %.6g, %d eigenvalues", label, float(vals[0]), vals.numel())

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for label, s in result["spectra"].items():
        vals = [v for v in s["eigenvalues"] if v > 0]
        what = ", ".join(([s["method"]] if s["method"] else [])
                         + ([f"density {s['density']:.4g}"] if s["density"] is not None else []))
        name = f"{label} ({what})" if what else label
        ax.plot(range(1, len(vals) + 1), vals, label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("NTK eigenvalue")
    ax.set_title(f"empirical NTK spectrum ({result['samples']} samples, {outputs}, BN {batchnorm})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(out_path)

    labels = list(result["spectra"])
    length = max(len(s["eigenvalues"]) for s in result["spectra"].values())
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank"] + labels)
        for i in range(length):
            w.writerow([i + 1] + [repr(result["spectra"][lab]["eigenvalues"][i])
                                  if i < len(result["spectra"][lab]["eigenvalues"]) else "" for lab in labels])
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    result["files"] = [out_path, stem + ".csv", stem + ".json"]
    return result
