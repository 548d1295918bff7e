"""The scorer interface shared by every pruning method.

The engine owns the loop (schedule, all-reduce, decay, threshold, restoration); a scorer
only turns the current masked network and this process's share of the pruning batches into
one saliency tensor per prunable parameter.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Type

import torch
from torch import nn
from torch.func import functional_call

from widetopo.options import Options, as_dict
from widetopo.engine.rng import make_generator


@dataclass
class Batch:
    """One pruning batch: its global index (for seeding), the inputs, the targets (or None)."""

    index: int
    x: torch.Tensor
    y: Optional[torch.Tensor] = None


@dataclass
class ScoreContext:
    """What a scorer sees of the run in one round.

    params:  every parameter of the model by name (detached tensors, no grad); the prunable
             ones hold the current masked weights theta * m.
    buffers: the scorer's private copy of the model's buffers (BatchNorm statistics); a scorer
             may overwrite them (calibration) - the caller's model is never touched.
    names:   the prunable parameter names, in `model.named_parameters()` order.
    masks:   bool masks aligned with `names`.
    """

    model: nn.Module
    names: List[str]
    params: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    masks: List[torch.Tensor]
    round: int = 0
    seed: int = 0
    density: float = 1.0
    prepass: Optional[List[torch.Tensor]] = None
    #: route ops without a double backward through twice-differentiable equivalents in
    #: forward() (the engine sets it from the scorer's needs_double_backward)
    twice_differentiable: bool = True
    #: set by score() of a scorer with reports_noise_floor: per prunable tensor, the rounding
    #: error of its score total (this process's share, same units as the finalized scores); the
    #: engine sums it over processes and refuses a round whose scores are rounding noise
    noise_floor: Optional[List[float]] = None
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.masks[0].device if self.masks else torch.device("cpu")

    @property
    def prunable(self) -> List[torch.Tensor]:
        """The current masked prunable weights, aligned with `names`."""
        return [self.params[n] for n in self.names]

    def generator(self, batch_index: int, stream: int = 0) -> torch.Generator:
        """Generator seeded by (seed, round, batch index, stream)."""
        return make_generator(self.seed, self.round, batch_index, self.device, stream)

    def forward(self, params: Dict[str, torch.Tensor], x: torch.Tensor, buffers=None) -> torch.Tensor:
        """f(x) with the given parameters (and the context's buffers unless given); with
        `twice_differentiable`, the ops that lack a double backward run through
        twice-differentiable equivalents (widetopo.scores.differentiable: same forward values)."""
        import contextlib

        from widetopo.scores.differentiable import twice_differentiable

        with twice_differentiable() if self.twice_differentiable else contextlib.nullcontext():
            out = functional_call(self.model, (params, self.buffers if buffers is None else buffers), (x,))
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"model must return a logits tensor, got {type(out).__name__}; wrap the model so "
                "that forward(x) returns a tensor"
            )
        return out


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


class Scorer(abc.ABC):
    """Saliency of every prunable weight; larger = more important.

    Attributes the engine reads:
      name                  - method name (the registry sets the registered name)
      data_dependent        - scores are sums over batches (summed across processes with all_reduce)
      decay                 - the engine applies density-aware decay after summing
      needs_targets         - the data must carry targets
      first_batch_only      - a data-free scorer that reads at most the first batch (its sample
                              shape, a probe input): with per-rank data under torch.distributed
                              every rank gets global batch 0; otherwise a data-free scorer gets
                              the whole pruning set on every rank (widetopo.distributed.data_split)
      needs_double_backward - the scores differentiate a gradient (checked before round 1)
      selection             - "global": keep the K highest scores over all tensors;
                              "layerwise": keep layer_quotas(ctx, K)[l] highest in each tensor l;
                              "mask": the scorer builds the masks itself (choose_masks), for
                              methods that keep whole kernels or graphs (K up to their rounding)
      reports_noise_floor   - score() sets ctx.noise_floor (one float per prunable tensor: the
                              rounding error of that tensor's score total); the engine refuses
                              a round where some tensor's total is within NOISE_MARGIN of it
                              (widetopo.engine.rounds.NoiseScoresError, with noise_advice())
      Options               - the options dataclass (widetopo.options.Options); an instance is
                              built from the constructor's keywords and kept as `self.options`

    Hooks, in the order the engine calls them in a round: prepass (optional, summed over every
    batch and process), score (summed the same way), finalize, then selection. validate is
    called once, when the run is set up (before any work).
    """

    name: str = "scorer"
    data_dependent: bool = True
    decay: bool = False
    needs_targets: bool = False
    first_batch_only: bool = False
    needs_double_backward: bool = False
    selection: str = "global"
    reports_noise_floor: bool = False
    Options: ClassVar[Type[Options]] = NoOptions
    #: replaced in __init__; this default serves subclasses that do not call Scorer.__init__
    options: Options = NoOptions()

    def __init__(self, *args, **kwargs):
        """Scorer(options) with an Options instance, or Scorer(**options) / positional values
        in field order, validated by the Options dataclass."""
        if len(args) == 1 and not kwargs and isinstance(args[0], Options):
            options = args[0]
            if not isinstance(options, self.Options):
                raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        else:
            options = self.Options(*args, **kwargs)
        self.options = options

    def __getattr__(self, key):
        # options read as attributes (scorer.eps); only reached when normal lookup fails
        options = self.__dict__.get("options")
        if options is not None and key in as_dict(options):
            return getattr(options, key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in as_dict(self.options).items())
        return f"{type(self).__name__}({opts})"

    def noise_advice(self) -> str:
        """What to change when a round's scores are rounding noise (named in NoiseScoresError)."""
        return ("the output the scores differentiate does not depend on these weights (e.g. train-mode "
                "BatchNorm on identical samples followed by a global pool); check the model and the options")

    def prepass(self, ctx: ScoreContext, batches: Sequence[Batch]) -> Optional[List[torch.Tensor]]:
        """Tensors summed over this process's batches that the score needs summed over the whole
        pruning set first (GraSP's gradient g). The engine sums them over every process and
        hands the totals to score() as ctx.prepass; over no batch (a process without batches)
        it must return zeros of the same shapes. A scorer without a prepass does not override
        this method."""
        return None

    @abc.abstractmethod
    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """One score tensor per name in ctx.names (same shape, floating), summed over `batches`."""

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """Map the scores summed over every batch (and, with torch.distributed, every process)
        to the final saliencies; the engine calls it after the all_reduce, before decay and the
        threshold. Default: unchanged. A score that is a function of a sum over the whole
        pruning set (SNIP's |sum_b g_b * theta|) returns the signed sum from score() and
        applies the function here, so the result does not depend on how batches are split."""
        return scores

    def validate(self, model: nn.Module, names: Sequence[str], options) -> None:
        """Refuse a run this method cannot do (options: the run's EngineOptions), with an error
        naming why; called by the engine before any work. Default: accept."""

    def choose_masks(self, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
        """For selection = "mask": the new bool masks (aligned with ctx.names, each a subset of
        ctx.masks) for a target of `keep` weights, from the finalized scores."""
        raise NotImplementedError(f"{type(self).__name__} has selection {self.selection!r}, not 'mask'")

    def layer_quotas(self, ctx: ScoreContext, keep: int) -> List[int]:
        """For selection = "layerwise": how many weights each prunable tensor keeps (aligned
        with ctx.names, summing to `keep`)."""
        raise NotImplementedError(f"{type(self).__name__} has selection {self.selection!r}, not 'layerwise'")
