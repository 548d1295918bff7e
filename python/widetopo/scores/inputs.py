"""Model inputs and outputs in the forms users feed and get them (docs/design.md §2.5).

Inputs: a tensor fed positionally, model(x), or keyword inputs, model(**inputs) - a dict batch
as Hugging Face models take it (input_ids, attention_mask, pixel_values, ...), its targets
taken out. Outputs: a logits tensor, a ModelOutput / dict with "logits" (and "loss" when the
model computed its own), or a tuple whose first element is the logits.

The *signal* is what the input-perturbing and data-free methods (ITA, NTK-SAP, SynFlow,
SynFlow-L2, PX) replace or perturb: the input itself when it is a floating tensor, the first
floating keyword input otherwise (pixel_values), and for token ids the output of the model's
input embedding (get_input_embeddings() of a Hugging Face model, which is what it computes as
inputs_embeds; the first nn.Embedding of any other model), replaced through a forward hook so
that everything after the lookup (position embeddings, attention masks) runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from widetopo.errors import UnsupportedInputsError

__all__ = ["Inputs", "Signalled", "ModelInput", "num_samples", "head", "concat", "shape_of", "signal_key",
           "token_key", "input_embedding", "call_model", "logits_of", "loss_of", "to_device"]


class Inputs(dict):
    """Keyword inputs of a model, fed as model(**inputs); .to() moves every tensor."""

    def to(self, *args, **kwargs) -> "Inputs":
        return Inputs({k: (v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v) for k, v in self.items()})


@dataclass(frozen=True)
class Signalled:
    """Inputs whose signal (see the module docstring) the forward replaces by fn(signal)."""

    inputs: Union[torch.Tensor, Inputs]
    fn: Callable[[torch.Tensor], torch.Tensor]

    def to(self, *args, **kwargs) -> "Signalled":
        return Signalled(self.inputs.to(*args, **kwargs), self.fn)


ModelInput = Union[torch.Tensor, Inputs, Signalled]


def to_device(x: ModelInput, device) -> ModelInput:
    return x.to(device)


def _plain(x: ModelInput):
    return x.inputs if isinstance(x, Signalled) else x


def first_tensor(x: ModelInput) -> torch.Tensor:
    x = _plain(x)
    if isinstance(x, torch.Tensor):
        return x
    for v in x.values():
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError(f"the inputs hold no tensor (keys {sorted(x)})")


def num_samples(x: ModelInput) -> int:
    """The sample count: the leading dimension of the input; of a dict, that of its first tensor
    with one (0-dim tensors, e.g. a scale, are passed through and say nothing of the count)."""
    t = first_tensor(x)
    if isinstance(_plain(x), torch.Tensor):
        return int(t.shape[0]) if t.dim() else 0
    return next((int(v.shape[0]) for v in _plain(x).values() if isinstance(v, torch.Tensor) and v.dim()), 0)


def _batched(v, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n


def head(x: ModelInput, count: int) -> ModelInput:
    """The first `count` samples (every tensor whose leading dimension is the sample count)."""
    if isinstance(x, Signalled):
        return Signalled(head(x.inputs, count), x.fn)
    if isinstance(x, torch.Tensor):
        return x[:count]
    n = num_samples(x)
    return Inputs({k: (v[:count] if _batched(v, n) else v) for k, v in x.items()})


def cast_floating(x: ModelInput, dtype: torch.dtype) -> ModelInput:
    """x with every floating tensor (the input, or each floating keyword input) cast to dtype."""
    if isinstance(x, Signalled):
        return Signalled(cast_floating(x.inputs, dtype), x.fn)
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    return Inputs((k, v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in x.items())


def take(x: ModelInput, index: torch.Tensor) -> ModelInput:
    """The samples at `index` (every tensor whose leading dimension is the sample count)."""
    if isinstance(x, torch.Tensor):
        return x[index]
    n = num_samples(x)
    return Inputs({k: (v[index.to(v.device)] if _batched(v, n) else v) for k, v in x.items()})


def concat(a: ModelInput, b: ModelInput) -> ModelInput:
    """The samples of `a` followed by those of `b` (same keys); signal functions apply to their
    own half."""
    if isinstance(a, Signalled) or isinstance(b, Signalled):
        n = num_samples(a)
        fa = a.fn if isinstance(a, Signalled) else None
        fb = b.fn if isinstance(b, Signalled) else None

        def fn(e: torch.Tensor) -> torch.Tensor:
            lo, hi = e[:n], e[n:]
            return torch.cat([fa(lo) if fa else lo, fb(hi) if fb else hi], dim=0)

        return Signalled(concat(_plain(a), _plain(b)), fn)
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    n = num_samples(a)
    return Inputs({k: (torch.cat([v, b[k]], dim=0) if _batched(v, n) else v) for k, v in a.items()})


def shape_of(x: ModelInput):
    """The input's shape: a list, or {key: list} for keyword inputs (tensors only)."""
    x = _plain(x)
    if isinstance(x, torch.Tensor):
        return list(x.shape)
    return {k: list(v.shape) for k, v in x.items() if isinstance(v, torch.Tensor)}


def sample_shape(x: ModelInput):
    """A hashable description of one sample's shape and dtype (to compare batches)."""
    x = _plain(x)
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in x.items() if isinstance(v, torch.Tensor))


def signal_key(x: Mapping) -> Optional[str]:
    """The first floating tensor with a sample dimension among keyword inputs, masks excluded
    (pixel_values), or None (0-dim values such as a scale are passed through, never perturbed)."""
    for k, v in x.items():
        if isinstance(v, torch.Tensor) and v.dim() and v.is_floating_point() and "mask" not in k:
            return k
    return None


def token_key(x: Mapping) -> Optional[str]:
    """The token ids among keyword inputs: input_ids, else the first integer tensor with a
    sample dimension that is not a mask."""
    if isinstance(x.get("input_ids"), torch.Tensor):
        return "input_ids"
    for k, v in x.items():
        if (isinstance(v, torch.Tensor) and v.dim() and not v.is_floating_point() and "mask" not in k
                and v.dtype != torch.bool):
            return k
    return None


def input_embedding(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """(name, module) of the model's input embedding: a Hugging Face model's
    get_input_embeddings(), else the first nn.Embedding / nn.EmbeddingBag; None if there is none."""
    found = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
    for name, module in model.named_modules():
        if (found is not None and module is found) or (found is None and isinstance(module, (nn.Embedding, nn.EmbeddingBag))):
            return name, module
    return None


def needs_embedding(x: ModelInput) -> bool:
    """True when the signal of `x` is the input embedding's output (integer inputs)."""
    x = _plain(x)
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point()
    return signal_key(x) is None


def check_signal(model: nn.Module, x: ModelInput, method: str, options: str) -> None:
    """Refuse (UnsupportedInputsError) inputs whose signal cannot be located."""
    if needs_embedding(x) and input_embedding(model) is None:
        raise UnsupportedInputsError(
            f"{method} acts on the floating input (or on the output of the input embedding for token ids), "
            f"but the inputs are {first_tensor(x).dtype} tensors and the model has no nn.Embedding; "
            f"{options}, or pass floating inputs"
        )


def signal_value(model: nn.Module, tensors: Mapping[str, torch.Tensor], x: ModelInput) -> torch.Tensor:
    """The signal of `x` (without a forward of the whole model): the floating input, or the input
    embedding's output for the token ids, with the parameters in `tensors`."""
    x = _plain(x)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    if isinstance(x, Mapping) and signal_key(x) is not None:
        return x[signal_key(x)]
    ids = x if isinstance(x, torch.Tensor) else x.get(token_key(x))
    found = input_embedding(model)
    if found is None or ids is None:
        raise UnsupportedInputsError("the inputs hold no floating tensor and the model has no input embedding")
    name, module = found
    prefix = f"{name}." if name else ""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    return functional_call(module, own, (ids,))


def accepts(model: nn.Module, key: str) -> bool:
    """True if model.forward takes the keyword `key` (by name or through **kwargs)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _Bound(nn.Module):
    """forward(inputs) = fn(model, inputs): lets functional_call swap the parameters of `model`
    under a user's forward_fn."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, inputs):
        return self.fn(self.model, inputs)


def call_model(model: nn.Module, tensors: Dict[str, torch.Tensor], x: ModelInput,
               forward_fn: Optional[Callable] = None, extra: Optional[Dict[str, Any]] = None):
    """The model's raw output for inputs `x` with the parameters and buffers in `tensors`
    (torch.func.functional_call): model(x), model(**x) or forward_fn(model, x); `extra` keywords
    (the labels) are added to keyword inputs. A Signalled input has its signal replaced."""
    fn = None
    if isinstance(x, Signalled):
        x, fn = x.inputs, x.fn
    handle = None
    if fn is not None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = fn(x)
        elif isinstance(x, Mapping) and signal_key(x) is not None:
            x = Inputs(x)
            x[signal_key(x)] = fn(x[signal_key(x)])
        else:
            found = input_embedding(model)
            if found is None:
                raise UnsupportedInputsError("the inputs hold no floating tensor and the model has no input embedding")
            handle = found[1].register_forward_hook(lambda module, args, out: fn(out))
    try:
        if forward_fn is not None:
            bound = _Bound(model, forward_fn)
            return functional_call(bound, {f"model.{k}": v for k, v in tensors.items()}, (x,))
        if isinstance(x, torch.Tensor):
            return functional_call(model, tensors, (x,))
        kwargs = dict(x)
        if extra:
            kwargs.update(extra)
        return functional_call(model, tensors, (), kwargs)
    finally:
        if handle is not None:
            handle.remove()


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: the tensor, out["logits"] of a ModelOutput / dict, or the
    first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedInputsError(
        "model must return a logits tensor, a ModelOutput/dict with 'logits' or a tuple whose first "
        f"element is the logits, got {type(out).__name__}; pass forward_fn=f with f(model, inputs) "
        "returning one of them"
    )


def loss_of(out) -> Optional[torch.Tensor]:
    """The loss a model computed itself from the labels: out["loss"] of a ModelOutput / dict, or
    the first element of a tuple when it is a scalar ((loss, logits, ...)); else None."""
    if isinstance(out, Mapping):
        loss = out.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        return out[0]
    return None


def scale_logits(out, factor: float):
    """The output with its logits multiplied by `factor` (same container)."""
    if isinstance(out, torch.Tensor):
        return out * factor
    if isinstance(out, Mapping):
        new = type(out)(out) if not isinstance(out, dict) or type(out) is dict else out.__class__(**out)
        new["logits"] = out["logits"] * factor
        return new
    return (out[0] * factor, *out[1:])
