"""NPB, node-path balancing (Pham et al., NeurIPS 2023); docs/design.md §5.11. Data-free.

1. ERK layer counts q_l (widetopo.scores.erk, summing to exactly K).
2. Layer by layer, in the order the forward pass reaches them, the path counts P of the layer's
   input units: the input of the layer in a forward of an all-ones sample through the network
   whose prunable weights are 0/1 masks (the masks already chosen this round for earlier layers),
   biases 0 and BatchNorm the identity, P[c] = sum over positions of |input[c]|. For nets of
   ReLU-type activations and sum/average pools these are path counts (up to a constant per layer,
   which cancels below); elsewhere (attention, LayerNorm, gates) a path-like input magnitude.
3. Per layer (in chunks of `chunk` rows of dim 0 when rows * cols > chunk_above) an integer
   program over the pair grid M (dim 0 x dim 1 of the weight; M_rc taps kept in that kernel):

       maximise  alpha * A + (1 - alpha) * B + beta * R
       s.t.      sum M = b (the chunk's share of q_l),  0 <= M_rc <= min(k_max, taps still kept)
       A = (active rows + active columns) / (rows + columns)   a unit is active when >= 1 of its
           pairs with P > 0 keeps a tap (input_term="port": the columns' part is the WideTopo
           port's C - max(0, 1 - sum_rc P_rc M_rc / max P), nearly constant: cvxpy read its
           elementwise product as a dot product)
       B = sum_rc P_rc M_rc / B_max   (B_max: the largest value any feasible M reaches)
       R = (pairs with M_rc >= 1) / b

   solved with scipy.optimize.milp (HiGHS); the solution is rounded (never truncated).
   Linear layers: k_max = 1 and beta = 0. Then each kernel keeps its M_rc largest-|theta| taps.
4. Other prunable tensors (rank 1, e.g. biases when selected) keep their q_l largest |theta|.

The engine takes these masks as they are (selection "mask"); score() returns |theta * m|, the
ranking of the taps inside a kernel (what widetopo.saliency gives).

Rounding: the per-layer counts are the ERK integers (exact K in total, largest remainder) and each
chunk's share of them is split in proportion to the chunk's capacity (largest remainder again),
with sum M = b as an equality. The objective is nondecreasing in M, so the equality loses nothing
against the paper's sum M <= ceil(d_l * numel) (which keeps up to one extra weight per chunk).

Why: at extreme sparsity, masks that keep many input-output paths and many active units train
better than masks that maximise either alone; balancing both per layer is NPB's principle.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import widetopo_ext
from widetopo.options import Options, integer, nonnegative, one_of, option, optional, shape
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.bn import batchnorm_modules, eval_mode
from widetopo.scores.baselines import AllOnesSample
from widetopo.scores.erk import context_erk_quotas

logger = logging.getLogger(__name__)

__all__ = ["NPBOptions", "NPBScorer", "npb_program", "npb_objective_terms", "path_budget_max", "split_budget"]

_PAIR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _milp():
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_array, vstack
    except ImportError:
        raise ImportError("npb solves integer programs with scipy.optimize.milp (HiGHS), but scipy is not "
                          "installed: pip install scipy  (or pip install 'widetopo[npb]')") from None
    return Bounds, LinearConstraint, milp, coo_array, vstack


def path_budget_max(paths: np.ndarray, upper: np.ndarray, budget: int) -> float:
    """max sum P * M over 0 <= M <= upper, sum M = budget: fill the largest P first."""
    order = np.argsort(-paths, kind="stable")
    take = np.minimum(upper[order], np.maximum(budget - np.concatenate([[0], np.cumsum(upper[order])[:-1]]), 0))
    return float((paths[order] * take).sum())


def npb_objective_terms(m: np.ndarray, paths: np.ndarray, budget: int, b_max: float,
                        input_term: str = "paper") -> Tuple[float, float, float]:
    """(A, B, R) of the pair matrix m (rows x cols) for path counts `paths` (same shape)."""
    rows, cols = m.shape
    live = (m * (paths > 0)) > 0
    if input_term == "port":
        cols_part = cols - max(0.0, 1.0 - float((paths / max(paths.max(), 1e-300) * m).sum()))
    else:
        cols_part = float(live.any(0).sum())
    a = (float(live.any(1).sum()) + cols_part) / (rows + cols)
    b = float((paths * m).sum()) / b_max if b_max > 0 else 0.0
    r = float((m > 0).sum()) / budget if budget > 0 else 0.0
    return a, b, r


def npb_program(paths: np.ndarray, upper: np.ndarray, budget: int, alpha: float = 0.01, beta: float = 1.0,
                input_term: str = "paper") -> np.ndarray:
    """The integer pair matrix M maximising alpha*A + (1-alpha)*B + beta*R (module docstring) for
    path counts `paths` and per-pair bounds `upper` (both rows x cols), sum M = budget."""
    Bounds, LinearConstraint, milp, coo_array, vstack = _milp()
    paths = np.asarray(paths, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.int64)
    rows, cols = paths.shape
    n = rows * cols
    if not 0 <= budget <= int(upper.sum()):
        raise ValueError(f"npb: budget must be in [0, {int(upper.sum())}] (the pairs' capacity), got {budget}")
    if budget == 0:
        return np.zeros((rows, cols), dtype=np.int64)
    peak = paths.max()
    p = paths / peak if peak > 0 else paths
    b_max = path_budget_max(p.ravel(), upper.ravel(), budget)
    use_z, use_a, port = beta > 0, alpha > 0, input_term == "port"
    # variables: M (n), z (n), a_rows (rows), a_cols (cols, paper) | s (1, port)
    nz = n if use_z else 0
    na = rows + (0 if port else cols) if use_a else 0
    ns = 1 if use_a and port else 0
    total = n + nz + na + ns
    c = np.zeros(total)
    if b_max > 0:
        c[:n] = -(1 - alpha) * p.ravel() / b_max
    if use_z:
        c[n:n + nz] = -beta / budget
    if use_a:
        c[n + nz:n + nz + na] = -alpha / (rows + cols)
        if port:
            c[-1] = alpha / (rows + cols)  # + alpha * (C - s) / (rows + cols); the constant C dropped
    if np.abs(c).max() > 0:
        c /= np.abs(c).max()  # a positive factor: same optimum, costs HiGHS does not find too small
    idx = np.arange(n).reshape(rows, cols)
    blocks, lo, hi = [], [], []
    blocks.append(coo_array((np.ones(n), (np.zeros(n), np.arange(n))), shape=(1, total)))
    lo.append([budget]), hi.append([budget])
    if use_z:  # z - M <= 0
        r = np.arange(n)
        blocks.append(coo_array((np.r_[np.ones(n), -np.ones(n)], (np.r_[r, r], np.r_[n + r, r])), shape=(n, total)))
        lo.append(np.full(n, -np.inf)), hi.append(np.zeros(n))
    if use_a:
        live = p > 0
        groups = [idx[i][live[i]] for i in range(rows)]
        if not port:
            groups += [idx[:, j][live[:, j]] for j in range(cols)]
        data, ri, ci = [], [], []
        for g, members in enumerate(groups):  # a_g - sum of the unit's live M <= 0
            ri += [g] * (len(members) + 1)
            ci += [n + nz + g] + list(members)
            data += [1.0] + [-1.0] * len(members)
        blocks.append(coo_array((data, (ri, ci)), shape=(len(groups), total)))
        lo.append(np.full(len(groups), -np.inf)), hi.append(np.zeros(len(groups)))
        if port:  # s >= 1 - sum p M  <=>  -s - sum p M <= -1
            row = coo_array((np.r_[-1.0, -p.ravel()], (np.zeros(n + 1), np.r_[total - 1, np.arange(n)])),
                            shape=(1, total))
            blocks.append(row)
            lo.append([-np.inf]), hi.append([-1.0])
    a_mat = vstack(blocks).tocsr()
    upper_all = np.r_[upper.ravel().astype(np.float64), np.ones(nz + na), np.full(ns, np.inf)]
    integrality = np.r_[np.ones(n), np.zeros(nz + na + ns)]  # z, a are integral at any optimum (M is)
    res = milp(c, constraints=LinearConstraint(a_mat, np.concatenate(lo), np.concatenate(hi)),
               bounds=Bounds(np.zeros(total), upper_all), integrality=integrality,
               options={"disp": False, "presolve": False})  # presolve reduces nothing here, costs seconds
    if res.x is None:
        raise RuntimeError(f"npb: the integer program found no solution ({res.message})")
    m = np.rint(res.x[:n]).astype(np.int64).reshape(rows, cols)
    m = np.clip(m, 0, upper)
    if int(m.sum()) != budget:  # cannot happen for an optimal solution of the equality-constrained program
        raise RuntimeError(f"npb: the program's rounded solution keeps {int(m.sum())} taps, not {budget}")
    return m


def split_budget(budget: int, capacities: Sequence[int]) -> List[int]:
    """`budget` split over chunks in proportion to their capacities, largest remainder (ties: the
    earlier chunk), each at most its capacity."""
    cap = sum(capacities)
    if cap == 0:
        return [0] * len(capacities)
    real = [budget * c / cap for c in capacities]
    out = [int(math.floor(r)) for r in real]
    for j in sorted(range(len(out)), key=lambda j: (-(real[j] - out[j]), j))[:budget - sum(out)]:
        out[j] += 1
    return out


@dataclass(frozen=True)
class NPBOptions(Options):
    alpha: float = option(0.01, "weight of the active-unit term A (1 - alpha weighs the path term B)", nonnegative)
    beta: float = option(1.0, "weight of the distinct-pair term R (0 for linear layers)", nonnegative)
    k_max: Optional[int] = option(None, "most taps kept per kernel (default: the kernel size; linear: 1)",
                                  optional(integer(1)))
    chunk: int = option(32, "rows (dim 0 units) per program when a layer has more than chunk_above pairs",
                        integer(1))
    chunk_above: int = option(128 * 128, "pairs (rows x cols) above which a layer is split into chunks", integer(1))
    input_term: str = option("paper", "'paper': A counts the active input units; 'port': the WideTopo port's "
                             "input term C - max(0, 1 - sum P M) (cvxpy read it as a dot product)",
                             one_of("paper", "port"))
    power_scale: float = option(1.0, "exponent of the ERK ratio of the layer counts", nonnegative)
    input_shape: Optional[Tuple[int, ...]] = option(
        None, "shape of one input sample (default: from the first batch)", optional(shape))

    def __post_init__(self):
        super().__post_init__()
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")


def _owner_modules(model: nn.Module, names: Sequence[str]) -> Dict[str, Tuple[nn.Module, str]]:
    from widetopo.sparsity.selection import parameter_owners

    owners = parameter_owners(model)
    return {n: (owners[n][0][1], owners[n][0][2]) for n in names}


class _Stop(Exception):
    pass


class NPBScorer(AllOnesSample, Scorer):
    """NPB (module docstring): ERK counts, then per-layer node-path integer programs."""

    name = "npb"
    data_dependent = False
    first_batch_only = True  # the sample shape of the first batch
    decay = False
    needs_targets = False
    selection = "mask"
    Options = NPBOptions

    # ------------------------------------------------------------------ checks (before any work)
    @staticmethod
    def _owners(model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> Dict[str, nn.Module]:
        """name -> the Conv/ConvTranspose/Linear module whose weight it is (rank >= 2 tensors);
        ValueError naming every other prunable matrix."""
        owners = _owner_modules(model, names)
        bad = [n for n, p in zip(names, params) if p.dim() >= 2 and not (
            isinstance(owners[n][0], _PAIR_MODULES + _TRANSPOSED) and owners[n][1] == "weight")]
        if bad:
            raise ValueError(
                f"npb: the path counts need each prunable matrix to be the weight of a Conv/ConvTranspose/Linear "
                f"layer (its input units are that layer's input channels); not so for {', '.join(bad)}; prune "
                "those with another method or leave them out of the prunable set")
        return {n: owners[n][0] for n in names}

    # ------------------------------------------------------------------ path counts
    def _path_net(self, ctx: ScoreContext, chosen: List[torch.Tensor]):
        """(params, buffers) of the counting net: prunable weights = masks, biases 0, BN identity."""
        names = set(ctx.names)
        params = {}
        for n, p in ctx.params.items():
            if n in names:
                continue
            local = n.rsplit(".", 1)[-1]
            params[n] = torch.zeros_like(p, dtype=torch.float64) if "bias" in local else p.detach().to(torch.float64)
        buffers = {n: b.detach().to(torch.float64) if b.is_floating_point() else b for n, b in ctx.buffers.items()}
        for prefix, bn in batchnorm_modules(ctx.model):
            pre = f"{prefix}." if prefix else ""
            for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
                store = params if f"{pre}{key}" in params else buffers
                if f"{pre}{key}" in store:
                    store[f"{pre}{key}"] = torch.full_like(store[f"{pre}{key}"], value)
            if f"{pre}running_var" in buffers:
                buffers[f"{pre}running_var"] = torch.full_like(buffers[f"{pre}running_var"], 1.0 - bn.eps)
        for n, m in zip(ctx.names, chosen):  # (a prunable bias stays 0: it carries no path)
            params[n] = torch.zeros_like(m, dtype=torch.float64) if "bias" in n.rsplit(".", 1)[-1] else m.to(torch.float64)
        return params, buffers

    def _input_of(self, ctx: ScoreContext, module: nn.Module, chosen, x) -> Optional[torch.Tensor]:
        """The first input `module` receives in the counting net (None if it is never called)."""
        seen = []

        def hook(mod, args):
            seen.append(args[0].detach())
            raise _Stop

        params, buffers = self._path_net(ctx, chosen)
        handle = module.register_forward_pre_hook(hook)
        try:
            with eval_mode(ctx.model), torch.no_grad():
                ctx.output(params, x, buffers)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0] if seen else None

    def _order(self, ctx: ScoreContext, owners, x) -> List[int]:
        """Prunable tensors in the order the forward pass first reaches their modules (never
        reached: at the end, in parameter order)."""
        first: Dict[int, int] = {}

        def hook(mod, args):
            first.setdefault(id(mod), len(first))

        handles = [module.register_forward_pre_hook(hook) for module in {id(o): o for o in owners.values()}.values()]
        try:
            params, buffers = self._path_net(ctx, list(ctx.masks))
            with eval_mode(ctx.model), torch.no_grad():
                ctx.output(params, x, buffers)
        finally:
            for h in handles:
                h.remove()
        return sorted(range(len(ctx.names)), key=lambda j: (first.get(id(owners[ctx.names[j]]), math.inf), j))

    @staticmethod
    def _pair_paths(module: nn.Module, weight: torch.Tensor, inp: Optional[torch.Tensor]) -> np.ndarray:
        """P per (dim 0, dim 1) pair of the weight: the path count of the input channel feeding it."""
        rows, cols = weight.shape[0], weight.shape[1]
        if inp is None:
            return np.ones((rows, cols))
        channel_dim = inp.dim() - 1 if isinstance(module, nn.Linear) else 1
        per_channel = inp.abs().transpose(channel_dim, -1).reshape(-1, inp.shape[channel_dim]).sum(0)
        p = per_channel.cpu().numpy().astype(np.float64)
        if isinstance(module, _TRANSPOSED):  # weight (in, out / groups, k): dim 0 is the input channel
            return np.repeat(p[:, None], cols, axis=1)
        groups = getattr(module, "groups", 1)
        group_of_row = np.arange(rows) // (rows // groups)
        return p[group_of_row[:, None] * cols + np.arange(cols)[None, :]]

    def _upper(self, m: torch.Tensor) -> np.ndarray:
        """Per (dim 0, dim 1) pair: the taps the program may keep, min(k_max, taps still kept)."""
        taps = m.reshape(m.shape[0], m.shape[1], -1)
        upper = taps.sum(-1).cpu().numpy().astype(np.int64)
        if taps.shape[-1] > 1 and self.options.k_max is not None:
            upper = np.minimum(upper, self.options.k_max)
        return upper

    # ------------------------------------------------------------------ score and masks
    def validate(self, model: nn.Module, names: Sequence[str], options) -> None:
        """Before any work: scipy is installed and every prunable matrix is a Conv/ConvTranspose/
        Linear weight."""
        _milp()
        self._owners(model, names, [dict(model.named_parameters())[n] for n in names])

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        """|theta * m|, the ranking of the taps inside a kernel; keeps the sample shape for
        choose_masks, which builds the masks once the round's K is known."""
        ctx.extra["npb_sample_shape"] = self._sample_shape(batches)
        return [p.detach().abs().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                for p in ctx.prunable]

    def choose_masks(self, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
        """ERK counts of min(keep, kept) weights, the per-layer programs, the largest taps."""
        sample = ctx.extra.get("npb_sample_shape")
        if sample is None:
            raise RuntimeError("npb: choose_masks needs the sample shape that score() keeps (internal error)")
        owners = self._owners(ctx.model, ctx.names, ctx.prunable)
        opts = self.options
        quotas = context_erk_quotas(ctx, min(keep, int(sum(int(m.sum()) for m in ctx.masks))), opts.power_scale)
        uppers = [self._upper(m) if m.dim() >= 2 else None for m in ctx.masks]
        for name, q, u in zip(ctx.names, quotas, uppers):
            if u is not None and q > int(u.sum()):
                raise ValueError(f"npb: layer {name!r} must keep {q} weights (its ERK count) but k_max = "
                                 f"{opts.k_max} taps per kernel allow only {int(u.sum())}; raise k_max or leave it None")
        x = (torch.ones((1, *sample), dtype=torch.float64, device=ctx.device) if isinstance(sample, tuple)
             else ctx.constant_inputs(sample, 1))
        chosen = [m.clone() for m in ctx.masks]  # the counting net's masks, replaced layer by layer
        for j in self._order(ctx, owners, x):
            name, w, m, mag = ctx.names[j], ctx.prunable[j], ctx.masks[j], scores[j]
            if w.dim() < 2:  # rank 1: the q largest |theta| (ties: the earlier entry)
                widetopo_ext.global_threshold([mag.masked_fill(m.logical_not(), -1.0)], [chosen[j]], quotas[j], "exact")
                continue
            module = owners[name]
            rows, cols = w.shape[0], w.shape[1]
            k = w[0, 0].numel()
            taps = m.reshape(rows, cols, k)
            upper = uppers[j]
            beta = opts.beta if k > 1 else 0.0
            paths = self._pair_paths(module, w, self._input_of(ctx, module, chosen, x))
            if not np.isfinite(paths).all():
                raise FloatingPointError(f"npb: the path counts reaching {name!r} overflowed float64")
            starts = list(range(0, rows, opts.chunk)) if rows * cols > opts.chunk_above else [0]
            ends = starts[1:] + [rows]
            shares = split_budget(quotas[j], [int(upper[a:b].sum()) for a, b in zip(starts, ends)])
            pairs = np.concatenate([npb_program(paths[a:b], upper[a:b], s, opts.alpha, beta, opts.input_term)
                                    for a, b, s in zip(starts, ends, shares)])
            # the M_rc largest-|theta| kept taps of each kernel (ties: the earlier tap)
            ranked = mag.reshape(rows, cols, k).masked_fill(taps.logical_not(), -1.0)
            order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k, device=order.device).expand_as(order))
            picked = (rank < torch.as_tensor(pairs, device=rank.device)[..., None]) & taps
            chosen[j] = picked.reshape(w.shape)
            logger.debug("npb: %s keeps %d taps over %d pairs", name, int(pairs.sum()), int((pairs > 0).sum()))
        return chosen
