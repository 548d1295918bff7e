"""Which parameters are prunable (the set P of docs/design.md §2).

Default set: the matrix weights of
  Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear   `weight`
  MultiheadAttention                            `in_proj_weight` (or `q_proj_weight`,
                                                `k_proj_weight`, `v_proj_weight` when kdim/vdim
                                                differ) and `out_proj.weight` (a Linear)
  the (in, out) layers of IN_OUT_LAYERS         `weight` (transformers' Conv1D: GPT-2's c_attn,
                                                c_proj, c_fc), read with dim 0 = input units
(subclasses included, e.g. LazyLinear). Recurrent layers, embeddings, norms, biases and tokens
are opt-in:
  include=(types...)  the matrix parameters of those module types (replaces the default types):
                      RNN/LSTM/GRU `weight_ih_l*`, `weight_hh_l*` (`_reverse` too) and LSTM
                      `weight_hr_l*`; RNN/LSTM/GRU cells `weight_ih`, `weight_hh`; Embedding /
                      EmbeddingBag / norm layers `weight`; any other type: its `weight` and every
                      other parameter of rank >= 2 it owns directly (biases excepted).
  include_norm        + the weights of BatchNorm/SyncBatchNorm/LayerNorm/GroupNorm/InstanceNorm
                      (and RMSNorm) layers.
  include_bias        + the biases of the selected modules (`bias`, `in_proj_bias`, `bias_k`,
                      `bias_v`, `bias_ih_l*`, `bias_hh_l*`, ...).
  include_tokens      + Embedding/EmbeddingBag weights and every parameter owned directly by a
                      module that is not a torch.nn layer nor an (in, out) layer (a ViT's
                      `cls_token`, `pos_embed`, `dist_token`, ...), biases excepted.
  pattern             a regular expression (re.search on the full name). With `include` it
                      filters that selection; without, it selects among *all* parameters, except
                      biases (unless include_bias) and norm-layer parameters (unless include_norm).
  names               an explicit list (exclusive with everything above).
The official ViT selection (WideTopo's ImageNet configs: patch embedding, qkv and projection
Linears, MLPs, LayerNorms, class token, position embedding) is
`include_norm=True, include_tokens=True`.

A parameter shared by several modules (tied weights) is one prunable tensor under its canonical
name, the first in `model.named_parameters()`; it is selected when any of its owners is.
Every parameter outside P is never pruned (its mask is implicitly all ones).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

from torch import nn

DEFAULT_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
    nn.MultiheadAttention,
)
NORM_TYPES: Tuple[Type[nn.Module], ...] = tuple(
    t for t in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, getattr(nn, "RMSNorm", None),
    ) if t is not None
)
EMBEDDING_TYPES: Tuple[Type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

#: Layers outside torch.nn whose `weight` is stored (in_features, out_features), the transpose
#: of nn.Linear: y = x @ W + b. One entry per class, (package or module prefix, class name),
#: matched by name against the module's class and its bases, so the package (transformers) stays
#: optional. They are selected by default and read with dim 0 = input units, dim 1 = output
#: units (widetopo.sparsity.topology). register_in_out_layer adds a class of your own.
IN_OUT_LAYERS: List[Tuple[str, str]] = [
    ("transformers", "Conv1D"),  # transformers.pytorch_utils.Conv1D (GPT-2, GPT, ...)
]

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")
_CELL_WEIGHT = re.compile(r"^weight_(ih|hh)$")
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _base(local: str) -> str:
    """The local name without torch.nn.utils.prune's `_orig` suffix."""
    return local[: -len("_orig")] if local.endswith("_orig") else local


def _own(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in module._parameters.items() if isinstance(p, nn.Parameter)]


def is_bias(local: str) -> bool:
    """`bias`, `bias_ih_l0`, `in_proj_bias`, `bias_k`, ... (also in `_orig` form)."""
    base = _base(local)
    return base.startswith("bias") or base.endswith("_bias")


def _weight_name(module: nn.Module) -> Optional[str]:
    """The local name of a module's weight parameter (`weight_orig` under torch.nn.utils.prune)."""
    for local in ("weight", "weight_orig"):
        if isinstance(module._parameters.get(local), nn.Parameter):
            return local
    return None


def _bias_name(module: nn.Module) -> Optional[str]:
    for local in ("bias", "bias_orig"):
        if isinstance(module._parameters.get(local), nn.Parameter):
            return local
    return None


def is_torch_layer(module: nn.Module) -> bool:
    """True for modules whose class is defined inside torch (nn.Linear, nn.LayerNorm, ...)."""
    return type(module).__module__.split(".")[0] == "torch"


def _class_key_matches(cls: type, prefix: str, name: str) -> bool:
    mod = getattr(cls, "__module__", "") or ""
    return cls.__name__ == name and (mod == prefix or mod.startswith(prefix + "."))


def is_in_out_layer(module: nn.Module) -> bool:
    """True when `module` (or a base class) is listed in IN_OUT_LAYERS: its weight is (in, out)."""
    return any(_class_key_matches(cls, prefix, name)
               for cls in type(module).__mro__ for prefix, name in IN_OUT_LAYERS)


def register_in_out_layer(cls: type) -> None:
    """Declare that `cls` (an nn.Module subclass) stores its `weight` as (in, out): it is then
    selected by default and read the right way round. Idempotent."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_in_out_layer: cls must be an nn.Module subclass, got {cls!r}")
    key = (cls.__module__, cls.__name__)
    if key not in IN_OUT_LAYERS:
        IN_OUT_LAYERS.append(key)


def matrix_parameters(module: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(owning module, local name) of the weights `include=(type(module),)` selects."""
    if isinstance(module, nn.MultiheadAttention):
        out = [(module, k) for k, _ in _own(module) if _base(k) in _MHA_WEIGHTS]
        proj = getattr(module, "out_proj", None)
        if isinstance(proj, nn.Module) and _weight_name(proj):
            out.append((proj, _weight_name(proj)))
        return out
    if isinstance(module, nn.RNNBase):
        return [(module, k) for k, _ in _own(module) if _RNN_WEIGHT.match(_base(k))]
    if isinstance(module, nn.RNNCellBase):
        return [(module, k) for k, _ in _own(module) if _CELL_WEIGHT.match(_base(k))]
    weight = _weight_name(module)
    out = [(module, weight)] if weight else []
    if isinstance(module, DEFAULT_TYPES + NORM_TYPES + EMBEDDING_TYPES + (nn.Bilinear,)) or is_in_out_layer(module):
        return out
    return out + [(module, k) for k, p in _own(module) if k != weight and p.dim() >= 2 and not is_bias(k)]


def bias_parameters(module: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(owning module, local name) of the biases `include_bias` adds for a selected module."""
    out = [(module, k) for k, _ in _own(module) if is_bias(k)]
    if isinstance(module, nn.MultiheadAttention):
        proj = getattr(module, "out_proj", None)
        if isinstance(proj, nn.Module) and _bias_name(proj):
            out.append((proj, _bias_name(proj)))
    return out


def token_parameters(module: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(owning module, local name) of what `include_tokens` adds: Embedding weights, and every
    non-bias parameter a non-torch.nn module owns directly (cls_token, pos_embed, ...)."""
    if isinstance(module, EMBEDDING_TYPES):
        weight = _weight_name(module)
        return [(module, weight)] if weight else []
    if is_torch_layer(module) or is_in_out_layer(module):
        return []
    return [(module, k) for k, _ in _own(module) if not is_bias(k)]


def canonical_names(model: nn.Module) -> Dict[int, str]:
    """id(parameter) -> its canonical name (the first in named_parameters(); tied weights once)."""
    return {id(p): n for n, p in model.named_parameters()}


def parameter_owners(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Module, str]]]:
    """canonical name -> every (module name, module, local name) that holds that parameter, in
    named_modules() order (a tied weight has several owners; the first is the canonical one)."""
    canon = canonical_names(model)
    owners: Dict[str, List[Tuple[str, nn.Module, str]]] = {}
    for prefix, module in model.named_modules():
        for local, p in _own(module):
            name = canon.get(id(p))
            if name is not None:
                owners.setdefault(name, []).append((prefix, module, local))
    return owners


def _check_types(include) -> Tuple[Type[nn.Module], ...]:
    if include is None:
        return DEFAULT_TYPES
    if isinstance(include, type):
        include = (include,)
    try:
        types = tuple(include)
    except TypeError:
        raise TypeError(f"include must be a module type or a sequence of module types, got {include!r}") from None
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not types:
        raise TypeError(
            f"include must contain nn.Module subclasses (e.g. nn.Conv2d, nn.Linear), got {include!r}"
        )
    return types


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def select_prunable(
    model: nn.Module,
    include: Optional[Iterable[Type[nn.Module]]] = None,
    names: Optional[Sequence[str]] = None,
    pattern: Optional[str] = None,
    include_bias: bool = False,
    include_norm: bool = False,
    include_tokens: bool = False,
) -> List[str]:
    """Names of the prunable parameters, in `model.named_parameters()` order (see the module
    docstring for the default set and what every option adds)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include_bias = _check_flag("include_bias", include_bias)
    include_norm = _check_flag("include_norm", include_norm)
    include_tokens = _check_flag("include_tokens", include_tokens)
    all_names = [n for n, _ in model.named_parameters()]
    if names is not None:
        if include is not None or pattern is not None or include_bias or include_norm or include_tokens:
            raise ValueError(
                "names is an explicit list of prunable parameters; do not combine it with "
                "include, pattern, include_bias, include_norm or include_tokens"
            )
        if isinstance(names, str):
            names = [names]
        names = list(names)
        known = set(all_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            shown = ", ".join(all_names[:12]) + (", ..." if len(all_names) > 12 else "")
            raise ValueError(f"names: unknown parameter name(s) {unknown}; the model has: {shown}")
        if len(set(names)) != len(names):
            raise ValueError(f"names: duplicate entries in {names}")
        if not names:
            raise ValueError("no prunable parameters selected: names is empty; pass names=[...] with at "
                             "least one parameter name, or include=(module types) or pattern=...")
        wanted = set(names)
        return [n for n in all_names if n in wanted]

    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"pattern: not a valid regular expression ({exc})") from None
    types = _check_types(include)
    canon = canonical_names(model)
    wanted = set()

    def add(pairs):
        for module, local in pairs:
            p = module._parameters.get(local)
            if isinstance(p, nn.Parameter) and id(p) in canon:
                wanted.add(canon[id(p)])

    modules = list(model.modules())
    if regex is not None and include is None:
        # pattern alone: every parameter is a candidate, biases and norm parameters on request
        for module in modules:
            norm = isinstance(module, NORM_TYPES)
            add((module, k) for k, _ in _own(module)
                if (include_bias or not is_bias(k)) and (include_norm or not norm))
    else:
        for module in modules:
            if isinstance(module, types) or (include is None and is_in_out_layer(module)):
                add(matrix_parameters(module))
                if include_bias:
                    add(bias_parameters(module))
            if include_norm and isinstance(module, NORM_TYPES):
                weight = _weight_name(module)
                add([(module, weight)] if weight else [])
                if include_bias:
                    add(bias_parameters(module))
            if include_tokens:
                add(token_parameters(module))
    selected = [n for n in all_names if n in wanted]
    if regex is not None:
        selected = [n for n in selected if regex.search(n)]
    if not selected:
        raise ValueError(
            "no prunable parameters selected: the model has no "
            + (f"weights of the selected module types ({', '.join(t.__name__ for t in types)}"
               + (", " + ", ".join(n for _, n in IN_OUT_LAYERS) if include is None else "") + ")"
               if regex is None or include is not None else "parameters")
            + (f" matching pattern {pattern!r}" if pattern is not None else "")
            + "; pass include=(module types), names=[...] or pattern=..."
        )
    return selected
