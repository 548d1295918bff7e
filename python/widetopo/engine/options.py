"""The engine's run options, declared once (widetopo.options): the API, the CLI, the mask
metadata and the checkpoint fingerprint read this dataclass. A method's Schedule
(widetopo.methods) overrides the defaults of rounds/restorations/restore_steps/restore_rounds,
which are declared here (a Schedule field left out takes them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import widetopo_ext
from widetopo.options import Options, any_integer, as_dict, between, boolean, integer, one_of, option, optional
from widetopo.engine.schedule import COUNTS, schedule_kind

__all__ = ["EngineOptions", "RESULT_NEUTRAL", "DATA_SPLITS"]

#: data_split values: how the ranks' data arguments form the pruning set under torch.distributed
#: (docs/distributed.md): "replicated" = every rank passes the whole set, "per_rank" = each rank
#: passes its own part (DistributedSampler style; the set is their union in rank order), "auto" =
#: "replicated" when every rank's data has the same digest, else "per_rank"
DATA_SPLITS = ("auto", "per_rank", "replicated")

def _schedule(name: str, value) -> str:
    try:
        return schedule_kind(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _path(name: str, value):
    import os

    if value is None:
        return None
    try:
        return os.fspath(value)
    except TypeError:
        raise TypeError(f"{name} must be a path or None, got {value!r}") from None


def _device(name: str, value):
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device or its name, got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu' or a CUDA device ('cuda', 'cuda:N'), got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} is {value!r}, but this torch has no usable CUDA device; use 'cpu'")
    return device


def _callable(name: str, value):
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")
    return value


def callable_name(fn) -> Optional[str]:
    """module.qualname of a hook (what the mask metadata and the checkpoint fingerprint record)."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


@dataclass(frozen=True)
class EngineOptions(Options):
    rounds: int = option(1, "T: scoring rounds from density 1 to the target", integer(1))
    restorations: int = option(0, "R: mask restorations after the first T rounds", integer(0))
    restore_steps: int = option(50, "J: steps of one restoration", integer(1))
    restore_rounds: Optional[int] = option(None, "T': rounds after each restoration (None: T)", optional(integer(1)))
    schedule: str = option("poly", "density schedule: 'poly' (geometric), 'linear' or 'cosine'", _schedule)
    compression_factor: float = option(5.0, "gamma of the density-aware decay (below 0.1 its factor underflows)",
                                      between(0.1, 1e6))
    count: str = option("exact", "'exact' keeps round(d*N_P); 'official' the published code's counting",
                        one_of(*COUNTS))
    seed: int = option(0, "seed of every random draw (with round and batch index)", any_integer)
    noise_scale: float = option(widetopo_ext.DEFAULT_NOISE_SCALE,
                                "scale of the restoration noise (at most 0.01, so kept entries always stay)",
                                between(0.0, 0.01))
    verbose: bool = option(True, "progress bar on a terminal", boolean)
    max_samples: Optional[int] = option(None, "read only the first N samples of the data", optional(integer(1)))
    checkpoint: Optional[str] = option(None, "checkpoint file: resume a killed run", _path)
    device: Any = option(None, "pruning device (default: the model's)", _device)
    data_device: Any = option(None, "where the pruning set is kept (default: the pruning device; "
                                    "'cpu' moves one batch at a time)", _device)
    shard_scores: bool = option(False, "under torch.distributed: each process sums and selects only its share "
                                       "of the prunable tensors (sharded top-k); same masks", boolean)
    data_split: str = option("auto", "under torch.distributed: 'per_rank' (each process passes its own part "
                                     "of the pruning set, which is their union), 'replicated' (each passes "
                                     "the whole set) or 'auto' (replicated iff every process's data is equal)",
                             one_of(*DATA_SPLITS, aliases={"per-rank": "per_rank"}))
    forward_fn: Any = option(None, "forward_fn(model, inputs) -> output (a logits tensor, a ModelOutput/dict with "
                                   "'logits', or a tuple starting with the logits), replacing model(x) / model(**batch) "
                                   "in every method", _callable)
    loss_fn: Any = option(None, "loss_fn(output, target) -> scalar loss of the loss-based methods (default: the "
                                "model's own loss when the batch holds 'labels', else cross entropy of the logits)",
                          _callable)

    @property
    def post_rounds(self) -> int:
        return self.rounds if self.restore_rounds is None else self.restore_rounds

    def result_settings(self) -> Dict[str, Any]:
        """The options that shape the result (mask metadata, checkpoint fingerprint)."""
        out = {k: v for k, v in as_dict(self).items() if k not in RESULT_NEUTRAL}
        out["restore_rounds"] = self.post_rounds
        for hook in ("forward_fn", "loss_fn"):  # recorded by name (a function is not JSON)
            out[hook] = callable_name(out[hook])
        return out


#: options that do not change the masks (data_split: the masks depend on the split it resolves
#: to, which the engine records itself as "data_split" in the metadata and checkpoint fingerprint)
RESULT_NEUTRAL = ("verbose", "checkpoint", "device", "data_device", "shard_scores", "data_split")
