"""Float64 references of what the library computes, written out plainly for the tests: full sorts
instead of the radix-select kernel, explicit formulas and loops, deep copies and plain autograd
instead of the scorers' hooks and functional calls. Each states its formula (docs/design.md);
the tests compare widetopo's results against these, never widetopo against itself.

Nothing here calls widetopo's threshold, decay, restoration or scoring code. Taken from widetopo
are only the seeded generators (widetopo.engine.rng.make_generator and the stream numbers), so
that a reference draws the random numbers of the run it checks, and the default prunable set
(select_prunable) for the SNIP-on-segmentation reference. (widetopo_ext/reference.py is the op
library's own pure-PyTorch reference of its kernels, a separate thing.)
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from scoring_nets import masked_copy
from widetopo.engine.restoration import RESTORE_STREAM
from widetopo.engine.rng import make_generator
from widetopo.scores.ita import ITA_STREAM
from widetopo.scores.ntk import NTK_STREAM
from widetopo.sparsity.selection import select_prunable

#: NTK-SAP's generator streams (docs/design.md §5.2): the noise input, the re-drawn weights, the
#: weight perturbation
NTKSAP_INPUT, NTKSAP_REINIT, NTKSAP_PERTURB = 31, 32, 33


# -------------------------------- selection, decay, restoration and a whole run (docs/design.md §2)
def reference_threshold(scores, masks, keep):
    """The `keep` highest scores among the kept entries (pruned ones never come back), by a
    full stable sort of the concatenated float64 scores: ties go to the first in list/flat order."""
    flat = torch.cat([torch.where(m, s.double(), -math.inf).reshape(-1) for s, m in zip(scores, masks)])
    order = torch.sort(-flat, stable=True).indices[:keep]
    new = torch.zeros(flat.numel(), dtype=torch.bool)
    new[order] = True
    out, off = [], 0
    for m in masks:
        out.append(new[off:off + m.numel()].view_as(m))
        off += m.numel()
    return out


def reference_decay(s, m, exponent):
    """Density-aware decay of docs/design.md §2.2 on one tensor viewed as (O, I, K):
    s * m / (kept connections of out-unit o * kept connections of in-unit i)^exponent
    (the product clamped at 1); rank-1 tensors are returned unchanged."""
    if m.dim() < 2:
        return s
    o, i = m.shape[0], m.shape[1]
    mm = m.reshape(o, i, -1).double()
    den = (mm.sum((1, 2))[:, None] * mm.sum((0, 2))[None, :]).clamp_min(1.0)
    f = mm * (den ** -exponent)[:, :, None]
    return (s.double().reshape(o, i, -1) * f).reshape(s.shape)


def reference_restore(masks, target, r, steps, seed, scale):
    """Straight statement of docs/design.md §2.3 with a full sort (ties -> first in list/flat order)."""
    masks = [m.clone() for m in masks]
    n = sum(m.numel() for m in masks)
    d_r = target ** ((2 ** (r + 1) - 1) / 2 ** (r + 1))
    for j in range(1, steps + 1):
        d_j = target + (d_r - target) * j / steps
        gen = make_generator(seed, -(r + 1), j, "cpu", RESTORE_STREAM)
        scores = []
        for m in masks:
            if m.dim() >= 2:
                o, i = m.shape[0], m.shape[1]
                noise = torch.randn((o, i), generator=gen)
                mm = m.reshape(o, i, -1).double()
                k = mm.shape[2]
                out_d = mm.sum((1, 2)) / (i * k)
                in_d = mm.sum((0, 2)) / (o * k)
                s = (1 - out_d)[:, None] * (1 - in_d)[None, :] + scale * noise.double()
                s = s[:, :, None].expand(o, i, k).reshape(m.shape)
                scores.append(torch.where(m, 2.0, s.float().double()).reshape(-1))
            else:
                scores.append(torch.where(m, 2.0, 1.0).double().reshape(-1))
        flat = torch.cat(scores)
        keep = int(math.floor(d_j * n + 0.5))
        order = torch.sort(-flat, stable=True).indices[:keep]
        new = torch.zeros(n, dtype=torch.bool)
        new[order] = True
        off = 0
        for m in masks:
            m.copy_(new[off:off + m.numel()].view_as(m))
            off += m.numel()
    return masks


def reference_group_restoration_scores(dense_m, dense_noise, group_of_out, group_of_in, scale):
    """Restoration scores on the dense equivalent with the docs/design.md §2.3 formula, unit densities
    normalised by the connections a unit *has* (its group's size), float64 loops."""
    o_n, i_n = dense_m.shape[0], dense_m.shape[1]
    k = math.prod(dense_m.shape[2:])
    m3 = dense_m.reshape(o_n, i_n, k)
    ins_of = [[i for i in range(i_n) if group_of_in[i] == group_of_out[o]] for o in range(o_n)]
    outs_of = [[o for o in range(o_n) if group_of_out[o] == group_of_in[i]] for i in range(i_n)]
    out = torch.zeros(o_n, i_n, k, dtype=torch.float64)
    for o in range(o_n):
        dout = sum(int(m3[o, i].sum()) for i in ins_of[o]) / (len(ins_of[o]) * k)
        for i in ins_of[o]:
            din = sum(int(m3[oo, i].sum()) for oo in outs_of[i]) / (len(outs_of[i]) * k)
            for kk in range(k):
                out[o, i, kk] = 2.0 if m3[o, i, kk] else (1 - dout) * (1 - din) + scale * float(dense_noise[o, i])
    return out.reshape(dense_m.shape)


def reference_run(model, density, seed, T, R, J, Tp, gamma=5.0, decay=True, scale=1e-5, norm=False):
    """A whole run of docs/design.md §2 (T rounds, R restorations of J steps, T' rounds after
    each) with the per-round scores of test_engine.RandScorer: U[0, 1) from the run's generator
    times (|theta| + 0.1). Returns ({name: mask}, kept count after every round and step)."""
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and (norm or p.dim() >= 2)]
    theta0 = [dict(model.named_parameters())[n].detach().clone() for n in names]
    theta = [t.clone() for t in theta0]
    masks = [torch.ones(t.shape, dtype=torch.bool) for t in theta]
    n = sum(t.numel() for t in theta)
    rnd = 0
    counts = []

    def score_rounds(start, rounds):
        nonlocal rnd, masks, theta
        for t in range(1, rounds + 1):
            rnd += 1
            kept = sum(int(m.sum()) for m in masks)
            d_t = start * (density / start) ** (t / rounds) if t < rounds else density
            gen = make_generator(seed, rnd, 0, "cpu", 0)
            scores = [torch.rand(p.shape, generator=gen) * (p.abs() + 0.1) for p in theta]
            if decay:
                c = -math.log10(kept / n)
                scores = [reference_decay(s, m, c / gamma) for s, m in zip(scores, masks)]
            keep = min(int(math.floor(d_t * n + 0.5)), kept)
            masks = reference_threshold(scores, masks, keep)
            theta = [p * m for p, m in zip(theta, masks)]
            counts.append(sum(int(m.sum()) for m in masks))

    score_rounds(1.0, T)
    for r in range(R):
        d_r = density ** ((2 ** (r + 1) - 1) / 2 ** (r + 1))
        for j in range(1, J + 1):
            d_j = density + (d_r - density) * j / J
            gen = make_generator(seed, -(r + 1), j, "cpu", RESTORE_STREAM)
            scores = []
            for m in masks:
                if m.dim() < 2:
                    scores.append(torch.where(m, 2.0, 1.0))
                    continue
                o, i = m.shape[0], m.shape[1]
                noise = torch.randn((o, i), generator=gen)
                mm = m.reshape(o, i, -1).double()
                k = mm.shape[2]
                od, idn = mm.sum((1, 2)) / (i * k), mm.sum((0, 2)) / (o * k)
                s = ((1 - od)[:, None] * (1 - idn)[None, :]).float() + scale * noise
                s = s[:, :, None].expand(o, i, k).reshape(m.shape)
                scores.append(torch.where(m, 2.0, s))
            flat = torch.cat([s.reshape(-1).double() for s in scores])
            keep = int(math.floor(d_j * n + 0.5))
            order = torch.sort(-flat, stable=True).indices[:keep]
            new = torch.zeros(n, dtype=torch.bool)
            new[order] = True
            off, out = 0, []
            for m in masks:
                out.append(new[off:off + m.numel()].view_as(m))
                off += m.numel()
            masks = out
            counts.append(sum(int(m.sum()) for m in masks))
        theta = [p * m for p, m in zip(theta0, masks)]
        score_rounds(max(sum(int(m.sum()) for m in masks) / n, density), Tp)
    return dict(zip(names, masks)), counts


# ------------------------------------------------------------------------------------------- losses
def per_pixel_loss(logits, y):
    """Mean cross entropy over the pixels whose target is not 255, by an explicit loop."""
    total, count = 0.0, 0
    for n in range(y.shape[0]):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                if int(y[n, i, j]) != 255:
                    z = logits[n, :, i, j]
                    total = total + torch.logsumexp(z, 0) - z[int(y[n, i, j])]
                    count += 1
    return total / count


# --------------------------------------------------------------------------------------------- SNIP
def reference_snip(model, ctx, batches, buffers_per_batch=None, per_batch_abs=False, bn_train=False):
    """|sum_b grad L_b * theta| with the gradient accumulated over the batches (per_batch_abs:
    sum_b |grad L_b * theta| instead, only to show that the two differ on the test data);
    bn_train: BatchNorm layers in train mode (batch statistics), everything else in eval mode."""
    total = None
    for k, b in enumerate(batches):
        net = masked_copy(model, ctx, buffers_per_batch[k] if buffers_per_batch else None).eval()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and bn_train:
                m.train()
        loss = F.cross_entropy(net(b.x), b.y)
        loss.backward()
        named = dict(net.named_parameters())
        s = [(named[n].grad * named[n]).detach() for n in ctx.names]
        s = [t.abs() for t in s] if per_batch_abs else s
        total = s if total is None else [a + c for a, c in zip(total, s)]
    return [t.abs() for t in total]


def reference_snip_ignore_index(model, batches, ignore_index):
    """SNIP by hand in float64: |sum_b dL_b/dtheta * theta| over the default prunable weights,
    L_b = per-pixel cross entropy of the eval-mode logits, averaged over the pixels whose target
    is not ignore_index (written out: -log softmax at the target, masked mean)."""
    net = copy.deepcopy(model).double().eval()
    names = select_prunable(net)
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in batches:
        logp = torch.log_softmax(net(x.double()), dim=1)
        keep = y != ignore_index
        picked = logp.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
        loss = -(picked * keep).sum() / keep.sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g
    return {n: (total[n] * params[n]).abs().detach() for n in names}


# ----------------------------------------------------- SynFlow and SynFlow-L2 (docs/design.md §5.5)
def reference_synflow(model, ctx, sample_shape):
    """Straightforward float64 SynFlow: |theta| everywhere (state dict), eval, all-ones input."""
    net = masked_copy(model, ctx).double().eval()
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.abs_()
    r = net(torch.ones((1, *sample_shape), dtype=torch.float64)).sum()
    r.backward()
    named = dict(net.named_parameters())
    return [(named[n].grad * named[n]).abs().detach() for n in ctx.names], r.detach()


def deep_copy_masked(model, params):
    """A deep copy of `model` whose parameters are `params` (name -> tensor), in float64."""
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[n])
    return net


def reference_synflow_l2(model, ctx, sample_shape, q=1):
    """Float64 deep copy, every floating state-dict entry squared, eval mode, h = sum f(1),
    S = |theta|^q * dh/d(theta^2)."""
    net = deep_copy_masked(model, ctx.params).eval()
    with torch.no_grad():
        for n, b in net.named_buffers():
            b.copy_(ctx.buffers[n])
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.pow_(2)
    net(torch.ones((1, *sample_shape), dtype=torch.float64)).sum().backward()
    named = dict(net.named_parameters())
    return [(named[n].grad * ctx.params[n].double().abs() ** q).abs() for n in ctx.names]


def synflow_l2_closed_form(W1, W2, q):
    """S(W1_js) = |W1_js|^q sum_k W2_kj^2, S(W2_kj) = |W2_kj|^q sum_s W1_js^2 (explicit loops)."""
    S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    for j in range(W1.shape[0]):
        for s in range(W1.shape[1]):
            S1[j, s] = abs(float(W1[j, s])) ** q * sum(float(W2[k, j]) ** 2 for k in range(W2.shape[0]))
        for k in range(W2.shape[0]):
            S2[k, j] = abs(float(W2[k, j])) ** q * sum(float(W1[j, s]) ** 2 for s in range(W1.shape[1]))
    return S1, S2


# ---------------------------------------------------------------------- GraSP (docs/design.md §5.3)
def bn_train_copy(model):
    """A deep copy in eval mode with its BatchNorm layers in train mode (batch statistics)."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


def loss_at(model, w, names, x, y, temperature, loss_fn=F.cross_entropy):
    """loss_fn(f(x; w) / T, y) on a fresh deep copy with BatchNorm in train mode."""
    net = bn_train_copy(model)
    params = {n: p.detach() for n, p in net.named_parameters()}
    params.update(zip(names, w))
    return loss_fn(functional_call(net, params, (x,)) / temperature, y)


def grad_at(model, w, names, pairs, temperature, create_graph=False, loss_fn=F.cross_entropy):
    """[sum_b dL_b/dw per tensor] (w: list of leaves)."""
    total = None
    for x, y in pairs:
        gs = torch.autograd.grad(loss_at(model, w, names, x, y, temperature, loss_fn), w, create_graph=create_graph)
        total = list(gs) if total is None else [a + b for a, b in zip(total, gs)]
    return total


def reference_grasp(model, w, masks, names, pairs, temperature=200.0, loss_fn=F.cross_entropy):
    """theta * Hg * m by an explicit double backward per batch (g = sum_b grad L_b * m)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    g = [a.detach() * m for a, m in zip(grad_at(model, leaves, names, pairs, temperature, loss_fn=loss_fn), masks)]
    hg = [torch.zeros_like(t) for t in w]
    for x, y in pairs:
        gs = torch.autograd.grad(loss_at(model, leaves, names, x, y, temperature, loss_fn), leaves, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(gs, g))
        hg = [h + d for h, d in zip(hg, torch.autograd.grad(z, leaves))]
    return [t.detach() * h * m for t, h, m in zip(w, hg, masks)], g


# ------------------------------------------------------------- iterative SNIP (docs/design.md §5.4)
def train_bn_only(net):
    """BatchNorm layers in train mode, everything else in eval mode."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return net


def reference_iter_snip(model, theta, masks, names, pairs, loss_fn=None):
    """|theta * dL/dtheta| with L = sum_b mean CE_b(f(x_b; theta * m)), the gradient taken with
    respect to the raw theta through the product (pruned entries get 0 from the chain rule),
    BatchNorm with batch statistics; a fresh deep copy of the model per batch."""
    loss_fn = loss_fn or F.cross_entropy
    leaves = {n: theta[n].detach().clone().requires_grad_(True) for n in names}
    for x, y in pairs:
        net = train_bn_only(copy.deepcopy(model))
        params = {n: p.detach() for n, p in net.named_parameters()}
        for n, m in zip(names, masks):
            params[n] = leaves[n] * m.to(leaves[n].dtype)
        loss_fn(functional_call(net, params, (x,)), y).backward()
    return [(leaves[n] * leaves[n].grad).abs().detach() for n in names]


# -------------------------------------------------------------------- NTK-SAP (docs/design.md §5.2)
def tiny_cnn_reinit(gen):
    """Fresh weights of TinyCNN written out by hand, in named_parameters order: Kaiming normal
    (fan_in, ReLU gain) conv/linear weights, zero biases, BatchNorm weight 1 / bias 0."""
    d = torch.float64
    return {
        "conv1.weight": torch.randn(4, 1, 3, 3, generator=gen, dtype=d) * math.sqrt(2 / 9),
        "conv1.bias": torch.zeros(4, dtype=d),
        "bn1.weight": torch.ones(4, dtype=d), "bn1.bias": torch.zeros(4, dtype=d),
        "conv2.weight": torch.randn(6, 4, 3, 3, generator=gen, dtype=d) * math.sqrt(2 / 36),
        "bn2.weight": torch.ones(6, dtype=d), "bn2.bias": torch.zeros(6, dtype=d),
        "fc.weight": torch.randn(5, 96, generator=gen, dtype=d) * math.sqrt(2 / 96),
        "fc.bias": torch.zeros(5, dtype=d),
    }


def reference_ntksap(model, ctx, batches, eps=0.01, noise_input=True, reinit=True):
    """|sum_b dF_b/dm| * m, F_b = sum_n ||f(xi; w * m) - f(xi; (w + eps delta) * m)||^2, by hand."""
    total = [torch.zeros_like(ctx.params[n]) for n in ctx.names]
    for b in batches:
        xi = (torch.randn(b.x.shape, generator=make_generator(ctx.seed, ctx.round, b.index, "cpu", NTKSAP_INPUT),
                          dtype=torch.float64) if noise_input else b.x)
        w = (tiny_cnn_reinit(make_generator(ctx.seed, ctx.round, b.index, "cpu", NTKSAP_REINIT)) if reinit
             else {n: p.clone() for n, p in ctx.params.items()})
        gen = make_generator(ctx.seed, ctx.round, b.index, "cpu", NTKSAP_PERTURB)
        delta = {n: torch.randn(w[n].shape, generator=gen, dtype=torch.float64) for n in ctx.names}
        m = {n: mk.double().requires_grad_(True) for n, mk in zip(ctx.names, ctx.masks)}

        net = copy.deepcopy(model)  # BatchNorm statistics of f(xi; w * m), by hand
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(w[n] * m[n] if n in m else w[n])
        net.eval()
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = 1.0
                mod.train()
        with torch.no_grad():
            net(xi)
        net.eval()
        a = {n: (w[n] * m[n] if n in m else w[n]) for n in w}
        p = {n: ((w[n] + eps * delta[n]) * m[n] if n in m else w[n]) for n in w}
        f = (functional_call(net, a, (xi,)) - functional_call(net, p, (xi,))).pow(2).sum()
        f.backward()
        total = [t + m[n].grad for t, n in zip(total, ctx.names)]
    return [t.abs() * mk for t, mk in zip(total, ctx.masks)]


# ------------------------------------------------------------------------- PX (docs/design.md §5.1)
def px_closed_form(W1, W2, M1, M2, x, gate):
    """docs/design.md §5.1, explicit loops: G_k = sum_n sum_j M2_kj a_j(x_n) sum_s M1_js x_ns^2,
    S(W1_js) = W1_js^2 sum_k W2_kj^2 G_k, S(W2_kj) = W2_kj^2 G_k sum_s W1_js^2."""
    K, J = W2.shape
    S_ = W1.shape[1]
    G = torch.zeros(K, dtype=torch.float64)
    for k in range(K):
        for n in range(x.shape[0]):
            z = [sum(float(W1[j, s]) * float(x[n, s]) for s in range(S_)) for j in range(J)]
            for j in range(J):
                G[k] += float(M2[k, j]) * gate(z[j]) * sum(float(M1[j, s]) * float(x[n, s]) ** 2 for s in range(S_))
    S1 = torch.zeros_like(W1)
    S2 = torch.zeros_like(W2)
    for j in range(J):
        for s in range(S_):
            S1[j, s] = W1[j, s] ** 2 * sum(W2[k, j] ** 2 * G[k] for k in range(K))
        for k in range(K):
            S2[k, j] = W2[k, j] ** 2 * G[k] * sum(W1[j, s] ** 2 for s in range(S_))
    return S1, S2


def reference_px_R(model, ctx, x):
    """R = sum_n sum_k z1[n,k] z2[k] of a bias-free ReLU MLP by explicit layer loops."""
    Ws = [ctx.params[n] for n in ctx.names]
    Ms = [m.double() for m in ctx.masks]
    a, g = x, x ** 2
    for W, M in zip(Ws[:-1], Ms[:-1]):
        z = a @ W.T
        gate = (z > 0).double()
        a, g = torch.relu(z), (g @ M.T) * gate
    z1 = g @ Ms[-1].T
    h = torch.ones(x.shape[1], dtype=torch.float64)
    for W in Ws:
        h = (W ** 2) @ h
    return float((z1 * h).sum())


class PathBN(nn.Module):
    """PX's batchnorm="running" written out from the running statistics: y = s^2 x + c in the
    h-net, x + c in the g-net, s = gamma / sqrt(var + eps), c = beta - s * mean."""

    def __init__(self, bn, square):
        super().__init__()
        s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.c = (bn.bias.detach() - s * bn.running_mean).view(1, -1, 1, 1)
        self.f = (s * s if square else torch.ones_like(s)).view(1, -1, 1, 1)

    def forward(self, x):
        return x * self.f + self.c


def reference_px(model, ctx, batches, bn="running"):
    """Straightforward PX: three deep copies per batch, activations replaced by hand, the h-net
    on a full all-ones batch, one backward per batch, |summed gradient| * theta^2. bn: the
    BatchNorm2d layers of the g-net and h-net as PathBN ("running"), in train or eval mode."""
    total = {n: torch.zeros_like(ctx.params[n], dtype=torch.float64) for n in ctx.names}
    masks = dict(zip(ctx.names, ctx.masks))

    def copy_with(values, bn_mode, square=False):
        net = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(values(n))
            for n, b in net.named_buffers():
                b.copy_(ctx.buffers[n])
        for name, m in list(net.named_modules()):
            if isinstance(m, nn.BatchNorm2d) and bn_mode == "train":
                m.train()
            if isinstance(m, nn.BatchNorm2d) and bn_mode == "running":
                net.set_submodule(name, PathBN(m, square))
        return net

    for b in batches:
        gates = []
        act_net = copy_with(lambda n: ctx.params[n], "eval")
        act_net.act = lambda z: (gates.append((z > 0).double()), torch.relu(z))[1]
        with torch.no_grad():
            act_net(b.x)
        g_net = copy_with(lambda n: masks[n].double() if n in masks else ctx.params[n], bn)
        queue = list(gates)
        g_net.act = lambda z: z * queue.pop(0)
        with torch.no_grad():
            z1 = g_net(b.x ** 2)
        assert not queue
        h_net = copy_with(lambda n: ctx.params[n] ** 2 if n in masks else ctx.params[n], bn, square=True)
        h_net.act = lambda z: z
        z2 = h_net(torch.ones_like(b.x))
        (z1 * z2).sum().backward()
        named = dict(h_net.named_parameters())
        for n in ctx.names:
            total[n] += named[n].grad
    return [total[n].abs() * ctx.params[n] ** 2 for n in ctx.names]


# ------------------------------------------ NTK trace and ITA (the two terms of the WideTopo score)
def reference_ntk(model, ctx, batch, probes=1):
    """|sum_probes h * theta * m| with h = grad ||m * grad <v, f>||^2, plain autograd."""
    net = masked_copy(model, ctx).eval()
    named = dict(net.named_parameters())
    all_params = list(named.values())
    pr = [named[n] for n in ctx.names]
    mask_of = {n: m.to(torch.float64) for n, m in zip(ctx.names, ctx.masks)}
    gen = make_generator(ctx.seed, ctx.round, batch.index, "cpu", NTK_STREAM)
    out = net(batch.x)
    total = [torch.zeros_like(p) for p in pr]
    for _ in range(probes):
        v = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        g = torch.autograd.grad((v * out).sum(), all_params, create_graph=True)
        t = 0
        for (n, _), gi in zip(named.items(), g):
            gi = gi * mask_of[n] if n in mask_of else gi
            t = t + (gi * gi).sum()
        h = torch.autograd.grad(t, pr, retain_graph=True)
        total = [a + b for a, b in zip(total, h)]
    return [(hs * ctx.params[n] * mask_of[n]).abs().detach() for hs, n in zip(total, ctx.names)]


def _set_tensor(net, name, value):
    """Replace parameter `name` of `net` by a plain (graph-carrying) tensor."""
    *path, attr = name.split(".")
    mod = net
    for p in path:
        mod = getattr(mod, p)
    del mod._parameters[attr]
    setattr(mod, attr, value)


def reference_ita(model, ctx, batch, eps_x=5e-4, eps_theta=5e-4, draw_dtype=None):
    """Four separate forwards through deep copies; gradient w.r.t. an explicit mask tensor.
    draw_dtype: dtype in which the random draws are made (default: the data's)."""
    gen = make_generator(ctx.seed, ctx.round, batch.index, "cpu", ITA_STREAM)
    x = batch.x
    dd = draw_dtype or x.dtype
    dx = torch.randn(x.shape, generator=gen, dtype=dd).to(x.dtype)
    dtheta = [torch.randn(ctx.params[n].shape, generator=gen, dtype=dd).to(x.dtype) for n in ctx.names]
    masks = [m.to(x.dtype).requires_grad_(True) for m in ctx.masks]
    nets = []
    for perturbed in (False, True):
        net = masked_copy(model, ctx).eval()
        for n, m, mb, d in zip(ctx.names, masks, ctx.masks, dtheta):
            theta_m = ctx.params[n] * mb.to(x.dtype)  # theta * m, a constant
            c = theta_m + eps_theta * d if perturbed else theta_m
            _set_tensor(net, n, c * m)
        for p in net.parameters():
            p.requires_grad_(False)
        nets.append(net)
    src, tgt = nets
    xp = x + eps_x * dx
    o_s, p_s, o_t, p_t = src(x), src(xp), tgt(x), tgt(xp)
    delta = (p_t - o_t) - (p_s - o_s)
    a = (delta ** 2).sum() / (eps_x * eps_theta)
    grads = torch.autograd.grad(a, masks)
    return [(g * (mk != 0)).abs() for g, mk in zip(grads, ctx.masks)]


# ----------------------------------------------------------------------------- multi-head attention
def reference_attention(q, k, v, mask=None, causal=False, scale=None):
    """Explicit loops over batch, head and query position, float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                logits = []
                for j in range(k.shape[2]):
                    allowed = not (causal and j > i)
                    add = 0.0
                    if mask is not None:
                        mij = mask[..., i, j].reshape(-1)[0] if mask.dim() == 2 else mask[b, h, i, j]
                        if mask.dtype == torch.bool:
                            allowed = allowed and bool(mij)
                        else:
                            add = float(mij)
                    logits.append(float(q[b, h, i] @ k[b, h, j]) * scale + add if allowed else -math.inf)
                w = torch.tensor(logits, dtype=torch.float64)
                w = torch.zeros_like(w) if torch.isinf(w).all() else torch.softmax(w, 0)
                out[b, h, i] = w @ v[b, h]
    return out


# ----------------------------------------------------------------- batch normalisation in eval mode
def reference_eval_batchnorm(x, mean, var, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


# ------------------------------------------------------------------------- models (widetopo.models)
def reference_vit(model, x):
    """The ViT forward written out in float64 with an explicit softmax, head by head."""
    m = model
    d = m.cls_token.shape[-1]
    p = m.patch_size
    n, c, h, w = x.shape
    x = x.double()
    # patches as flattened (c, p, p) vectors in row-major patch order, times the conv weight
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(n, -1))
    patches = torch.stack(rows, 1)
    tokens = patches @ m.patch_embed.weight.double().reshape(d, -1).T + m.patch_embed.bias.double()
    tokens = torch.cat([m.cls_token.double().expand(n, 1, d), tokens], 1) + m.pos_embed.double()

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + mod.eps) * mod.weight.double() + mod.bias.double()

    def lin(t, mod):
        out = t @ mod.weight.double().T
        return out + mod.bias.double() if mod.bias is not None else out

    for blk in m.blocks:
        a = ln(tokens, blk.norm1)
        qkv = lin(a, blk.attn.qkv)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        heads = blk.attn.heads
        hd = d // heads
        outs = []
        for hh in range(heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
            outs.append(att @ v[..., sl])
        tokens = tokens + lin(torch.cat(outs, -1), blk.attn.proj)
        b = ln(tokens, blk.norm2)
        tokens = tokens + lin(F.gelu(lin(b, blk.fc1)), blk.fc2)
    return lin(ln(tokens, m.norm)[:, 0], m.head)


# ------------------------------------------------- effective sparsity (widetopo.sparsity.effective)
def reference_effective_mlp(masks_list):
    """Effective weights and nodes of an MLP (masks of its layers in order) by explicit boolean
    path counting: forward reachability, backward co-reachability."""
    reach = [torch.ones(masks_list[0].shape[1], dtype=torch.bool)]
    for m in masks_list:
        reach.append((m & reach[-1][None, :]).any(1))
    feeds = [torch.ones(masks_list[-1].shape[0], dtype=torch.bool)]
    for m in reversed(masks_list):
        feeds.insert(0, (m & feeds[0][:, None]).any(0))
    eff, nodes = [], []
    for k, m in enumerate(masks_list):
        e = m & reach[k][None, :] & feeds[k + 1][:, None]
        eff.append(int(e.sum()))
        nodes.append(int((reach[k + 1] & feeds[k + 1]).sum()))
    return eff, nodes
