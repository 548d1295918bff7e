"""Effective sparsity: which kept weights and which units still lie on an input -> output path.

At extreme sparsity many kept weights are useless: a weight whose input unit receives nothing
(every incoming weight pruned) or whose output unit feeds nothing carries no signal. Counting
only the kept weights overstates what the pruned network can use (docs/design.md §6).

The method works for any architecture (residual, attention, ...) because it only needs a
forward and a backward pass:

* every masked tensor is replaced by its mask m (float64; ``magnitudes=True`` uses |θ|⊙m),
  every unmasked tensor of rank >= 2 by ones, every tensor of rank < 2 (biases, norm scales)
  by zeros; normalisation layers become the identity and max-pools become average pools, so
  every value is >= 0 and "non-zero" means "reached by some path";
* the input is one sample of strictly positive values (a fixed draw from U[0.5, 1.5)), the
  output is summed. In a network of non-negative weights, identity norms, ReLUs and average
  pools any positive input gives the same zero pattern as an all-ones input; the
  draw differs from ones only so that tokens differ: with identical tokens, attention's
  softmax has an exactly zero gradient (Σ_j ∂p_j/∂s_k (v_j - v̄) with all v_j equal), which
  would mark every query/key weight ineffective although it lies on a path;
* a weight is *effective* iff it is kept and d(Σ outputs)/dw != 0, i.e. its input unit is
  reached from the input and its output unit reaches the output;
* the units of a Conv/Linear layer (and of an (in, out) layer such as GPT-2's Conv1D,
  widetopo.sparsity.selection.IN_OUT_LAYERS, whose output features are dim 1) are its output
  channels/features (dim 0 of a Conv/Linear weight); a
  unit is an *effective node* iff at some position its activation and the gradient of the
  summed output with respect to it are both non-zero;
* the node ratio = effective nodes of the pruned net / units of the dense net.

Magnitudes. Unscaled, values are products of weights over depth and can leave float64's range:
with ones, a layer of fan-in 4608 (VGG's 3x3x512) multiplies a value by up to 4608, so about 84
such layers overflow; with |θ| (Kaiming, ~0.02 at that fan-in) sparse layers shrink values by
orders of magnitude each, toward underflow, and an underflowed 0 would make a reached unit look
unreached. That is why the default uses m, not |θ|⊙m, and why every tensor is rescaled. Only
*which* values are zero matters, and multiplying a tensor by a positive constant never changes
that, so every tensor is divided by its largest per-output-unit sum (the largest kept fan-in
for m). Then no activation exceeds the largest value entering the layer (no overflow) and a
layer shrinks a value by at most that fan-in (float64 holds ~600 orders of magnitude). A
non-finite value is reported as an error, never as a silent answer; a value near the bottom of
float64's range (a path some 130+ layers long through units far weaker than their neighbours)
is logged as a warning, since a further shrink would have hidden it.

Token models (docs/design.md §2.5). Given example `inputs` instead of a shape (a tensor of token
ids or a dict batch as the model takes it, e.g. input_ids and attention_mask; its first sample is
used, targets dropped), the positive draw replaces the *signal*: the floating input, or the
output of the input embedding for token ids (a Hugging Face model's inputs_embeds), through a
forward hook, so position embeddings and attention masks act as usual. A masked input embedding
is an input table, not a path: its entry (token, j) is effective iff it is kept and feature j of
the embedding output reaches the output. `forward_fn(model, inputs)` replaces model(x) /
model(**inputs) for custom forwards; the logits of a ModelOutput / tuple are summed.

The caller's model is never modified: the pass runs through torch.func.functional_call on a
deep copy in eval mode.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from widetopo.sparsity.selection import is_in_out_layer

logger = logging.getLogger(__name__)

__all__ = ["effective_sparsity", "input_shape_from_meta"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_UNIT_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def input_shape_from_meta(meta: Mapping) -> Optional[tuple]:
    """(in_channels, H, W) from mask-file metadata (in_channels, image_size), or None."""
    if not meta or "in_channels" not in meta or "image_size" not in meta:
        return None
    size = meta["image_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(meta["in_channels"]), int(h), int(w))


def _scaled(values: torch.Tensor, in_out: bool = False) -> torch.Tensor:
    """values / (largest per-output-unit sum): a positive rescale that keeps the zero pattern.
    in_out: the tensor is stored (in, out), so output units are its columns."""
    if values.dim() < 2:
        return values
    per_unit = values.sum(0).flatten() if in_out else values.flatten(1).sum(1)
    top = float(per_unit.max()) if per_unit.numel() else 0.0
    return values / top if top > 0 else values


def _identity_hook(module, inputs, output):
    return inputs[0]


_MAX_TO_AVG = {
    nn.MaxPool1d: nn.functional.avg_pool1d, nn.MaxPool2d: nn.functional.avg_pool2d, nn.MaxPool3d: nn.functional.avg_pool3d,
}
_ADAPTIVE_MAX_TO_AVG = {
    nn.AdaptiveMaxPool1d: nn.functional.adaptive_avg_pool1d, nn.AdaptiveMaxPool2d: nn.functional.adaptive_avg_pool2d,
    nn.AdaptiveMaxPool3d: nn.functional.adaptive_avg_pool3d,
}


def _avg_pool_hook(module, inputs, output):
    """A max-pool routes the gradient to the window maximum only; an average pool over the same
    window reaches every element, which is what "on some path" means."""
    x = inputs[0]
    if type(module) in _ADAPTIVE_MAX_TO_AVG:
        return _ADAPTIVE_MAX_TO_AVG[type(module)](x, module.output_size)
    return _MAX_TO_AVG[type(module)](x, module.kernel_size, module.stride, module.padding, module.ceil_mode)


def _check(model, masks, input_shape, inputs=None):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool tensor (e.g. widetopo.Masks), got {type(masks).__name__}")
    params = dict(model.named_parameters())
    problems = []
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            problems.append(f"masks[{name!r}] must be a torch.bool tensor")
        elif name not in params:
            problems.append(f"masks[{name!r}] is not a parameter of the model")
        elif tuple(params[name].shape) != tuple(m.shape):
            problems.append(f"masks[{name!r}] has shape {list(m.shape)}, the parameter has {list(params[name].shape)}")
    if problems:
        raise ValueError("masks do not fit the model: " + "; ".join(problems))
    if (input_shape is None) == (inputs is None):
        raise ValueError("effective_sparsity: pass exactly one of input_shape (one sample's shape) and inputs "
                         "(an example batch: a tensor, e.g. token ids, or a dict of keyword inputs)")
    if inputs is not None:
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise TypeError(f"inputs must be a tensor or a dict of keyword inputs, got {type(inputs).__name__}")
        return params
    if (not isinstance(input_shape, Sequence) or not input_shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints (one sample, no batch "
                         f"dimension), got {input_shape!r}")
    return params


def _example(net: nn.Module, inputs, device):
    """(the first sample of `inputs` with its signal replaced by a positive draw, the signal leaf)."""
    from widetopo.constants import TARGET_KEYS
    from widetopo.scores.inputs import Inputs, Signalled, check_signal, head

    if isinstance(inputs, Mapping):
        inputs = Inputs((k, v) for k, v in inputs.items() if k not in TARGET_KEYS)
    x = head(inputs, 1).to(device)
    check_signal(net, x, "effective_sparsity", "pass input_shape for a floating input")
    gen = torch.Generator().manual_seed(0)
    leaf = []

    def positive(e: torch.Tensor) -> torch.Tensor:
        if not leaf:
            leaf.append((0.5 + torch.rand(e.shape, generator=gen, dtype=torch.float64)).to(e.device).requires_grad_(True))
        return leaf[0]

    return Signalled(x, positive), leaf


def effective_sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor], input_shape: Optional[Sequence[int]] = None,
                       *, inputs=None, forward_fn=None, magnitudes: bool = False) -> dict:
    """Kept / effective weights per masked tensor and effective nodes per Conv/Linear layer.

    Returns {"layers": {name: {"kept", "effective", "units", "effective_nodes"}}, "total":
    {"numel", "kept", "effective", "density", "effective_density", "nodes", "effective_nodes",
    "node_ratio"}}. "units"/"effective_nodes" are None for a masked tensor that is not the
    weight of a Conv/Linear layer; totals count the units of every Conv/Linear layer that owns a
    masked weight. input_shape is one sample's shape, e.g. (3, 32, 32); for token models pass
    `inputs` instead (an example batch: token ids, or a dict such as {input_ids, attention_mask}),
    and `forward_fn(model, inputs)` for a custom forward (see the module docstring).
    """
    from widetopo.scores.inputs import call_model, input_embedding, logits_of, needs_embedding

    params = _check(model, masks, input_shape, inputs)
    net = copy.deepcopy(model).eval()
    for module in net.modules():
        if isinstance(module, _NORMS):
            module.register_forward_hook(_identity_hook)
        elif type(module) in _ADAPTIVE_MAX_TO_AVG or (
                type(module) in _MAX_TO_AVG and not module.return_indices
                and all(d == 1 for d in torch.nn.modules.utils._ntuple(3)(module.dilation))):
            module.register_forward_hook(_avg_pool_hook)

    in_out = {f"{mod}.{local}" if mod else local for mod, module in model.named_modules() if is_in_out_layer(module)
              for local in ("weight",)}
    values: Dict[str, torch.Tensor] = {}
    for name, p in params.items():
        with torch.no_grad():
            if name in masks:
                m = masks[name].to(p.device, torch.float64)
                v = p.detach().double().abs() * m if magnitudes else m
            elif p.dim() >= 2:
                v = p.detach().double().abs() if magnitudes else torch.ones_like(p, dtype=torch.float64)
            else:
                v = torch.zeros_like(p, dtype=torch.float64)
            v = _scaled(v, name in in_out) if p.dim() >= 2 else v
        values[name] = v.requires_grad_(True)
    buffers = {n: (b.double() if b.is_floating_point() else b) for n, b in net.named_buffers()}

    # units: the outputs of the Conv/Linear layers that own a masked weight
    owners = {}
    for mod_name, module in net.named_modules():
        weight = f"{mod_name}.weight" if mod_name else "weight"
        if (isinstance(module, _UNIT_MODULES) or is_in_out_layer(module)) and weight in masks:
            owners[weight] = module
    captured: Dict[str, torch.Tensor] = {}

    def capture(weight_name):
        def hook(module, inputs, output):
            captured[weight_name] = output
            return output.clone()  # downstream in-place ops (ReLU(inplace=True)) touch the clone
        return hook

    for weight_name, module in owners.items():
        module.register_forward_hook(capture(weight_name))

    device = next(iter(values.values())).device if values else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    table = None  # a masked input embedding when the signal replaces its output
    if inputs is None:
        x = (0.5 + torch.rand((1, *input_shape), generator=gen, dtype=torch.float64)).to(device)
        leaf = []
    else:
        x, leaf = _example(net, inputs, device)
        found = input_embedding(net)
        if needs_embedding(x) and found is not None:
            table = f"{found[0]}.weight" if found[0] else "weight"
    with torch.enable_grad():  # also when the caller is inside torch.no_grad()
        out = logits_of(call_model(net, {**values, **buffers}, x, forward_fn))
        if not torch.isfinite(out).all():
            raise FloatingPointError("effective_sparsity: the path-counting forward pass overflowed")
        names = list(masks)
        unit_names = [n for n in names if n in captured]
        grads = torch.autograd.grad(out.sum(), [values[n] for n in names] + [captured[n] for n in unit_names] + leaf,
                                    allow_unused=True)
    w_grads, u_grads = grads[:len(names)], grads[len(names):len(names) + len(unit_names)]
    if table in masks and leaf and grads[-1] is not None:
        # entry (token, j) of the input table: effective iff feature j of its output reaches the output
        reach = (grads[-1] != 0).reshape(-1, grads[-1].shape[-1]).any(0)
        w_grads = list(w_grads)
        w_grads[names.index(table)] = reach.to(torch.float64).expand(masks[table].shape)

    tiny = [t for t in list(w_grads) + list(u_grads) + [captured[n] for n in unit_names] if t is not None]
    if any(bool(((t != 0) & (t.abs() < 1e-280)).any()) for t in tiny):
        logger.warning("effective_sparsity: some path values are within a few orders of magnitude of float64 "
                       "underflow; a path even weaker would have been counted as absent")

    layers, total_kept, total_eff = {}, 0, 0
    for name, g in zip(names, w_grads):
        kept_mask = masks[name].to(values[name].device)
        if g is not None and not torch.isfinite(g).all():
            raise FloatingPointError(f"effective_sparsity: the gradient of {name!r} overflowed")
        eff = int((kept_mask & (g != 0)).sum()) if g is not None else 0
        kept = int(kept_mask.sum())
        layers[name] = {"kept": kept, "effective": eff, "units": None, "effective_nodes": None}
        total_kept += kept
        total_eff += eff
    nodes, eff_nodes = 0, 0
    for name, g in zip(unit_names, u_grads):
        act = captured[name].detach()
        dim = 1 if isinstance(owners[name], nn.modules.conv._ConvNd) else act.dim() - 1
        reached = act != 0
        feeds = (g != 0) if g is not None else torch.zeros_like(reached)
        on_path = (reached & feeds).movedim(dim, 0).flatten(1).any(1)
        units = int(on_path.numel())
        layers[name]["units"] = units
        layers[name]["effective_nodes"] = int(on_path.sum())
        nodes += units
        eff_nodes += int(on_path.sum())
    numel = sum(masks[n].numel() for n in names)
    total = {
        "numel": numel, "kept": total_kept, "effective": total_eff,
        "density": total_kept / numel if numel else 1.0,
        "effective_density": total_eff / numel if numel else 1.0,
        "nodes": nodes, "effective_nodes": eff_nodes,
        "node_ratio": eff_nodes / nodes if nodes else None,
    }
    logger.debug("effective sparsity: %d of %d kept weights effective, %d of %d nodes", total_eff, total_kept, eff_nodes, nodes)
    return {"layers": layers, "total": total}
