"""Which parameters are prunable (the set P of DESIGN 2).

Default: the `weight` of every Conv1d/2d/3d and Linear module. The official configurations
also prune BatchNorm/LayerNorm weights and biases; `include_norm` / `include_bias` add them.
Every parameter outside P is never pruned (its mask is implicitly all ones).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple, Type

from torch import nn

DEFAULT_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
)


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


def select_prunable(
    model: nn.Module,
    include: Optional[Iterable[Type[nn.Module]]] = None,
    names: Optional[Sequence[str]] = None,
    pattern: Optional[str] = None,
    include_bias: bool = False,
    include_norm: bool = False,
) -> List[str]:
    """Names of the prunable parameters, in `model.named_parameters()` order.

    names:        an explicit list of parameter names (exclusive with include/pattern/flags).
    include:      module types whose weights are prunable (default Conv1d/2d/3d and Linear).
    include_norm: also the weights of BatchNorm/LayerNorm modules.
    include_bias: also the biases of the selected modules.
    pattern:      a regular expression; only names where `re.search(pattern, name)` matches stay.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    all_names = [n for n, _ in model.named_parameters()]
    if names is not None:
        if include is not None or pattern is not None or include_bias or include_norm:
            raise ValueError(
                "names is an explicit list of prunable parameters; do not combine it with "
                "include, pattern, include_bias or include_norm"
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
        wanted = set(names)
        selected = [n for n in all_names if n in wanted]
    else:
        types = _check_types(include)
        if include_norm:
            types = types + NORM_TYPES
        wanted = set()
        for prefix, module in model.named_modules():
            if not isinstance(module, types):
                continue
            locals_ = [_weight_name(module)]
            if include_bias:
                locals_.append(_bias_name(module))
            for local in locals_:
                if local is not None:
                    wanted.add(f"{prefix}.{local}" if prefix else local)
        selected = [n for n in all_names if n in wanted]
        if pattern is not None:
            try:
                regex = re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"pattern: not a valid regular expression ({exc})") from None
            selected = [n for n in selected if regex.search(n)]
    if not selected:
        raise ValueError(
            "no prunable parameters selected: the model has no weights of the selected module "
            f"types ({', '.join(t.__name__ for t in _check_types(include)) if names is None else 'names'})"
            + (f" matching pattern {pattern!r}" if pattern is not None else "")
            + "; pass include=(module types), names=[...] or pattern=..."
        )
    return selected
