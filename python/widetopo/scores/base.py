"""The scorer interface shared by every pruning method.

The engine owns the loop (schedule, all-reduce, decay, threshold, restoration); a scorer
only turns the current masked network and this process's share of the pruning batches into
one saliency tensor per prunable parameter.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn

from widetopo.constants import IGNORE_INDEX
from widetopo.options import Options, as_dict
from widetopo.engine.rng import make_generator
from widetopo.scores import inputs as _inputs
from widetopo.scores.inputs import Inputs, ModelInput, Signalled


@dataclass
class Batch:
    """One pruning batch: its global index (for seeding), the model inputs x (a tensor fed as
    model(x), or keyword Inputs fed as model(**x), targets taken out), the targets y (or None),
    and label_key: the keyword under which the model takes y to compute its own loss ("labels"
    when the batch held them), or None."""

    index: int
    x: Union[torch.Tensor, Inputs]
    y: Optional[torch.Tensor] = None
    label_key: Optional[str] = None

    @property
    def n(self) -> int:
        """The sample count (leading dimension of the first input tensor)."""
        return _inputs.num_samples(self.x)


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
    #: forward_fn(model, inputs) -> output, replacing model(x) / model(**x) (EngineOptions)
    forward_fn: Optional[Callable] = None
    #: loss_fn(output, target) -> scalar loss of the loss-based methods (EngineOptions)
    loss_fn: Optional[Callable] = None

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

    def inputs(self, batch: Batch) -> ModelInput:
        """The batch's model inputs on the scoring device."""
        return batch.x.to(self.device)

    def output(self, params: Dict[str, torch.Tensor], x: ModelInput, buffers=None, labels=None):
        """The model's raw output for inputs x (a tensor, keyword Inputs, or Signalled inputs) with
        the given parameters (and the context's buffers unless given): forward_fn(model, x) if set,
        else model(x) / model(**x, **labels). With `twice_differentiable`, the ops that lack a
        double backward run through twice-differentiable equivalents
        (widetopo.scores.differentiable: same forward values)."""
        import contextlib

        from widetopo.scores.differentiable import twice_differentiable

        tensors = (params, self.buffers if buffers is None else buffers)
        merged = {**tensors[0], **tensors[1]}
        with twice_differentiable() if self.twice_differentiable else contextlib.nullcontext():
            return _inputs.call_model(self.model, merged, x, self.forward_fn, labels)

    def forward(self, params: Dict[str, torch.Tensor], x: ModelInput, buffers=None) -> torch.Tensor:
        """The logits f(x) (see output(); a ModelOutput's logits, a tuple's first element)."""
        return _inputs.logits_of(self.output(params, x, buffers))

    def loss(self, params: Dict[str, torch.Tensor], batch: Batch, buffers=None, *,
             ignore_index: int = IGNORE_INDEX, temperature: float = 1.0, x: Optional[ModelInput] = None) -> torch.Tensor:
        """The task loss of one batch: loss_fn(output, y) if set; else the loss the model computes
        itself from batch.y given back as `batch.label_key` when its forward takes that keyword (a
        Hugging Face head's loss, the language models' shift included); else mean cross entropy of the logits (task_loss).
        temperature divides the logits first (GraSP); the model's own loss cannot take it, so a
        temperature != 1 then computes task_loss on the logits instead (see Scorer.check_inputs)."""
        from widetopo.scores.losses import task_loss

        x = self.inputs(batch) if x is None else x
        y = batch.y.to(self.device)
        if self.loss_fn is not None:
            out = self.output(params, x, buffers)
            return self.loss_fn(out if temperature == 1 else _inputs.scale_logits(out, 1.0 / temperature), y)
        own = (batch.label_key is not None and temperature == 1 and self.forward_fn is None
               and isinstance(_inputs._plain(x), Inputs) and _inputs.accepts(self.model, batch.label_key))
        out = self.output(params, x, buffers, {batch.label_key: y} if own else None)
        if own:
            loss = _inputs.loss_of(out)
            if loss is not None:
                return loss
        logits = _inputs.logits_of(out)
        return task_loss(logits if temperature == 1 else logits / temperature, y, ignore_index)

    def signal(self, x: ModelInput, params: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The signal of x (docs/design.md §2.5): x itself when it is a floating tensor, the first
        floating keyword input, or the input embedding's output for token ids (with `params`,
        default the context's)."""
        return _inputs.signal_value(self.model, self.params if params is None else params, x)

    @staticmethod
    def with_signal(x: ModelInput, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelInput:
        """x with its signal replaced by fn(signal) in every forward (for a floating tensor: fn(x))."""
        x = _inputs._plain(x)
        return fn(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else Signalled(x, fn)

    def constant_inputs(self, x: ModelInput, samples: int, value: float = 1.0,
                        dtype: torch.dtype = torch.float64) -> ModelInput:
        """`samples` copies of x's first sample with the signal set to `value` everywhere (SynFlow's
        and PX's all-ones input; for a floating tensor simply full((samples, *shape), value))."""
        first = _inputs.head(_inputs._plain(x), 1)
        if isinstance(first, torch.Tensor) and first.is_floating_point():
            return torch.full((samples, *first.shape[1:]), value, dtype=dtype, device=self.device)
        copies = first
        for _ in range(samples - 1):
            copies = _inputs.concat(copies, first)
        return self.with_signal(copies.to(self.device), lambda e: torch.full(e.shape, value, dtype=dtype, device=e.device))


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

    #: the method replaces or perturbs the input (ITA, NTK-SAP's noise, SynFlow's ones, PX): on
    #: token ids it acts on the input embedding's output, and refuses models without one
    perturbs_inputs: bool = False
    #: the options a user can turn to avoid perturbing the input (named in the refusal)
    perturbs_inputs_options: str = "use a method that does not perturb the input"

    def check_inputs(self, model: nn.Module, batch: Batch, forward_fn: Optional[Callable],
                     loss_fn: Optional[Callable]) -> None:
        """Called by the engine on the first batch before any work: raise a widetopo error for
        inputs the method cannot act on. Default: perturbs_inputs methods need a locatable signal."""
        if self.perturbs_inputs:
            _inputs.check_signal(model, batch.x, self.name, self.perturbs_inputs_options)

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
