"""The pruning loop (docs/design.md §2): a phase plan (widetopo.engine.plan) of scoring rounds
(widetopo.engine.rounds: score -> all_reduce -> decay -> threshold -> theta <- theta * m) and mask
restorations (widetopo.engine.restoration), on private working copies (widetopo.engine.state).

The engine never modifies the caller's model: it works on detached copies of the parameters
(passed to the model with torch.func.functional_call) and of the buffers, and keeps theta_init
for the restorations. Module attributes a scorer touches (train/eval mode, BatchNorm momentum,
hooks) are restored when the run ends, and so is the global RNG. All mask arithmetic goes
through the widetopo_ext ops.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from widetopo.distributed import collectives as dist_utils
from widetopo.engine.batches import materialize_batches, model_digest
from widetopo.engine.checkpoint import Checkpoint
from widetopo.sparsity.masks import Masks
from widetopo.options import as_dict
from widetopo.sparsity.selection import select_prunable
from widetopo.engine.plan import Phase, make_plan, steps_before, total_steps
from widetopo.engine.progress import Progress
from widetopo.engine.restoration import restore_masks
from widetopo.engine.rounds import NonFiniteScoresError, ZeroScoresError, compute_scores, select_masks
from widetopo.engine.schedule import _check_density, density_schedule, keep_count
from widetopo.constants import TARGET_KEYS
from widetopo.scores.base import Batch, Scorer
from widetopo.scores.inputs import head, logits_of, shape_of
from widetopo.engine.options import EngineOptions, callable_name
from widetopo.sparsity import topology
from widetopo.sparsity.blocks import collapsed_parts, model_blocks

logger = logging.getLogger(__name__)

__all__ = ["Pruner", "NonFiniteScoresError", "ZeroScoresError", "materialize_batches"]


class _ModuleStateGuard:
    """Restores every submodule's attributes (training flag, BatchNorm momentum, hook and
    parameter dictionaries, attributes added by forward hooks) on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = []
        for module in self.model.modules():
            snap = {}
            for key, value in module.__dict__.items():
                contents = dict(value) if isinstance(value, dict) else None
                snap[key] = (value, contents)
            self.saved.append((module, snap))
        return self

    def __exit__(self, *exc):
        for module, snap in self.saved:
            state = module.__dict__
            for key in [k for k in state if k not in snap]:
                del state[key]
            for key, (value, contents) in snap.items():
                state[key] = value
                if contents is not None and (len(value) != len(contents) or any(
                    k not in value or value[k] is not v for k, v in contents.items()
                )):
                    value.clear()
                    value.update(contents)
        return False


class Pruner:
    """Iterative global pruning with a pluggable scorer.

    Phases: T scoring rounds on the schedule from 1 to d*; then R times: a restoration of J
    steps, theta <- theta_init * m, and T' scoring rounds from the density reached back to d*.
    Options: the fields of widetopo.engine.options.EngineOptions.
    """

    def __init__(self, model: nn.Module, scorer: Scorer, density: float, names: Optional[Sequence[str]] = None,
                 *, meta: Optional[dict] = None, **options):
        # every rank checks its arguments, then they agree: a rank that refuses them raises its
        # error, the others an error naming it (a no-op inside widetopo.prune's own check)
        with dist_utils.fail_together(dist_utils.collective_device(model), "checking the arguments of the Pruner"):
            self._init(model, scorer, density, names, meta, options)

    def _init(self, model, scorer, density, names, meta, options) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a widetopo.scores.Scorer, got {type(scorer).__name__}")
        self.density = _check_density("density", density)
        self.options = options = EngineOptions(**options)
        device = options.device
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model
        self.scorer = scorer
        self.names = select_prunable(model) if names is None else select_prunable(model, names=list(names))
        self.layouts = topology.unit_layouts(model, self.names)
        self.meta = dict(meta or {})
        self.plan: List[Phase] = make_plan(options.rounds, options.restorations, options.restore_steps,
                                           options.post_rounds)
        self._check_target_keeps_weights()
        scorer.validate(model, self.names, options)

    def _check_target_keeps_weights(self) -> None:
        params = dict(self.model.named_parameters())
        n_prunable = sum(params[n].numel() for n in self.names)
        n_all = sum(p.numel() for p in params.values())
        keep, _ = keep_count(self.density, n_prunable, n_all, self.options.count)
        if keep == 0 and self.options.count == "exact":  # (the official counting may keep nothing, as published)
            raise ValueError(
                f"density {self.density:g} keeps no weight of the {n_prunable} prunable ones "
                f"(count={self.options.count!r}); the smallest density that keeps one is about "
                f"{1 / n_prunable:.3g}"
            )

    # ------------------------------------------------------------------ public entry points
    def run(self, data: Iterable) -> Masks:
        """Prune; returns the masks. The caller's model and the global RNG are left unchanged."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _ModuleStateGuard(self.model):
            return self._run(data)

    def saliency(self, data: Iterable, masks: Optional[Mapping[str, torch.Tensor]] = None,
                 round_index: int = 1) -> Dict[str, torch.Tensor]:
        """The scores of one round for `masks` (default dense), summed over every batch and
        process and finalized, before decay and thresholding: {name: score tensor}."""
        devices = [self.device] if self.device.type == "cuda" else []
        with dist_utils.fail_together(self.device, "checking the masks of saliency"):
            chosen = None if masks is None else self._mask_list(masks)  # (before any collective of the run)
        with torch.random.fork_rng(devices=devices), _ModuleStateGuard(self.model):
            state, _, mine = self._prepare(data)
            if chosen is not None:
                state.set_masks(chosen)
            ctx = state.context(round_index, self.options.seed,
                                twice_differentiable=self.scorer.needs_double_backward)
            scores = compute_scores(self.scorer, ctx, mine, self.device, "saliency")
        return OrderedDict((n, s) for n, s in zip(self.names, scores))

    # ------------------------------------------------------------------ setup
    def _mask_list(self, masks: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        params = dict(self.model.named_parameters())
        missing = [n for n in self.names if n not in masks]
        extra = [n for n in masks if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"masks must cover exactly the prunable parameters; missing {missing}, "
                             f"not prunable {extra}")
        out = []
        for n in self.names:
            m = masks[n]
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[n].shape:
                raise ValueError(f"masks[{n!r}] must be a bool tensor of shape {tuple(params[n].shape)}, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
            out.append(m.to(self.device))
        return out

    def _prepare(self, data: Iterable):
        """Check that every rank runs the same pruning, read the data, resolve how the ranks'
        data form the pruning set (widetopo.distributed.data_split), build the working state, run
        one probe forward. Returns (state, this process's batches, the batches it scores)."""
        from widetopo.distributed.agreement import check_agreement
        from widetopo.distributed.data_split import resolve_split
        from widetopo.engine.state import PruneState

        rank, world = dist_utils.rank_world()
        store = self.options.data_device or self.device
        if world > 1:  # before any collective whose shapes depend on the run (one all_gather)
            check_agreement(self._settings(), self.device, "the pruning run before round 1")
        with dist_utils.fail_together(self.device, "reading the pruning data"):
            batches = materialize_batches(data, store, self.options.max_samples,
                                          pin=store.type == "cpu" and self.device.type == "cuda",
                                          allow_empty=world > 1)
            if self.scorer.needs_targets and any(b.y is None for b in batches):
                raise ValueError(f"method {self.scorer.name!r} needs targets: data must yield (input, target) batches "
                                 f"or dict batches with one of {list(TARGET_KEYS)}")
            if batches:
                self.scorer.check_inputs(self.model, batches[0], self.options.forward_fn, self.options.loss_fn)
        self._split = resolve_split(self.options.data_split, batches, self.device)
        state = PruneState(self.model, self.names, self.device, self.options.forward_fn, self.options.loss_fn)
        with dist_utils.fail_together(self.device, "the model's forward on the pruning data"):
            if batches:  # (a rank whose part of per-rank data is empty has nothing to probe)
                self._probe(state, batches[0])
                self._probe_calibration(state, batches)
                if self.scorer.needs_double_backward:
                    from widetopo.scores.differentiable import check_double_backward

                    check_double_backward(state.context(0, self.options.seed), batches[0].x, method=self.scorer.name)
        mine = self._split.mine(batches, self.scorer.data_dependent, self.scorer.first_batch_only, store,
                                self.device)
        return state, batches, mine

    def _settings(self) -> dict:
        """What every rank must agree on before round 1 (JSON values, compared across ranks):
        the method and its options, the density, the engine options (schedule included), the
        prunable selection and every parameter and buffer (the engine broadcasts them)."""
        from widetopo.engine.rounds import has_prepass

        scorer = self.scorer
        params = dict(self.model.named_parameters())
        out = {
            "method": f"{scorer.name} ({type(scorer).__module__}.{type(scorer).__qualname__})",
            "method options": [f"{k}={v!r}" for k, v in sorted(as_dict(scorer.options).items())],
            "scorer": [f"data_dependent={scorer.data_dependent}", f"prepass={has_prepass(scorer)}",
                       f"selection={scorer.selection}", f"decay={scorer.decay}",
                       f"first_batch_only={scorer.first_batch_only}",
                       f"needs_double_backward={scorer.needs_double_backward}"],
            "density": self.density,
        }
        out.update({f"option {k}": repr(callable_name(v) if k in ("forward_fn", "loss_fn") else v)
                    for k, v in as_dict(self.options).items()
                    if k not in ("verbose", "checkpoint", "device", "data_device")})
        options = set(as_dict(scorer.options))
        out.update({f"meta {k}": repr(v) for k, v in sorted(self.meta.items()) if k not in options})
        out["prunable parameters"] = [f"{n} {list(params[n].shape)}" for n in self.names]
        out["model parameters and buffers"] = [
            f"{kind} {n} {list(t.shape)} {t.dtype}" for kind, items in
            (("parameter", self.model.named_parameters()), ("buffer", self.model.named_buffers()))
            for n, t in items if t is not None]
        return out

    def _probe(self, state, batch: Batch) -> None:
        x = head(batch.x, 2).to(self.device)
        ctx = state.context(0, self.options.seed, twice_differentiable=False)
        self.model.eval()
        with torch.no_grad():
            try:
                out = ctx.output(state.params, x, state.buffers)
            except Exception as exc:
                message = (f"the model's forward failed on pruning batch {batch.index} (input shape "
                           f"{shape_of(batch.x)}): {exc}")
                try:
                    wrapped = type(exc)(message)
                except Exception:
                    raise exc from None
                raise wrapped from exc
        logits_of(out)  # a logits tensor, a ModelOutput / dict with logits, or (logits, ...)

    def _probe_calibration(self, state, batches: List[Batch]) -> None:
        """A batch of one sample cannot calibrate BatchNorm1d-like layers: for the data-driven
        methods (they calibrate or run BatchNorm on batch statistics) fail now, not in round 1
        (one no-grad train-mode forward of that batch, on scratch buffers)."""
        from widetopo.scores.bn import batchnorm_modules, calibrate_batchnorm

        smallest = min(batches, key=lambda b: b.n)
        if self.scorer.data_dependent and smallest.n == 1 and batchnorm_modules(self.model):
            calibrate_batchnorm(state.context(0, self.options.seed), smallest.x.to(self.device))

    # ------------------------------------------------------------------ checkpoint
    def _fingerprint(self, state, batches: List[Batch], world: int) -> dict:
        return {
            "scorer": f"{type(self.scorer).__module__}.{type(self.scorer).__qualname__}",
            "method": self.scorer.name,
            "options": repr(sorted(as_dict(self.scorer.options).items())),
            "meta": repr(sorted((k, repr(v)) for k, v in self.meta.items())),
            "density": self.density,
            **self.options.result_settings(),
            "names": list(self.names),
            "shapes": [list(p.shape) for p in state.working],
            "layouts": [repr(layout) for layout in self.layouts],
            "model_digest": model_digest(self.model),
            "data_split": self._split.mode,
            "batches": self._split.global_batches(),
            "data_digest": self._split.global_digest(),
            "world": world,
        }

    def _open_checkpoint(self, state, batches, world) -> Tuple[Optional[Checkpoint], int, int, float]:
        """(checkpoint or None, phase index, step within it, phase start density) to resume from."""
        if self.options.checkpoint is None:
            return None, 0, 0, 1.0
        rank, _ = dist_utils.rank_world()
        ckpt = Checkpoint(self.options.checkpoint, self._fingerprint(state, batches, world), writer=rank == 0)
        with dist_utils.fail_together(self.device, "opening the checkpoint"):
            ckpt.check_writable()
            saved = ckpt.load()
        if saved is None:
            return ckpt, 0, 0, 1.0
        state.load(saved)
        return ckpt, int(saved["phase"]), int(saved["step"]), float(saved["phase_start"])

    def _save(self, ckpt: Optional[Checkpoint], state, phase_i: int, step: int, phase_start: float) -> None:
        if ckpt is not None:
            with dist_utils.fail_together(self.device, "writing the checkpoint"):  # rank 0 writes
                ckpt.save({"phase": phase_i, "step": step, "phase_start": phase_start, **state.snapshot()})

    # ------------------------------------------------------------------ the loop
    def _run(self, data: Iterable) -> Masks:
        rank, world = dist_utils.rank_world()
        state, batches, mine = self._prepare(data)
        self._owner = self._owners(state)
        ckpt, phase_i, step, phase_start = self._open_checkpoint(state, batches, world)
        logger.info(
            "pruning %d prunable weights in %d tensors to density %g with %s (%d steps, %d batch(es) on this process)",
            state.n_prunable, len(state.working), self.density, self.scorer.name, total_steps(self.plan), len(mine),
        )
        progress = Progress(total_steps(self.plan), steps_before(self.plan, phase_i, step),
                            f"prune {self.meta.get('method', self.scorer.name)}",
                            self.options.verbose and rank == 0)
        try:
            for i in range(phase_i, len(self.plan)):
                first = step if i == phase_i else 0
                phase = self.plan[i]
                if phase.kind == "prune":
                    phase_start = self._prune_phase(state, mine, ckpt, i, first, phase_start, progress)
                else:
                    self._restore_phase(state, ckpt, i, first, phase_start, progress)
        finally:
            progress.close()
        return self._result(state, world)

    def _prune_phase(self, state, mine, ckpt, i: int, first: int, phase_start: float, progress) -> float:
        phase = self.plan[i]
        if first == 0:
            phase_start = 1.0 if phase.index == 0 else max(state.kept / state.n_prunable, self.density)
        densities = density_schedule(self.density, phase.length, self.options.schedule, start=phase_start)
        for t in range(first + 1, phase.length + 1):
            kept = self._score_round(state, mine, phase.first_round + t, densities[t - 1], phase.label)
            self._save(ckpt, state, i, t, phase_start)
            progress.step(phase.label, kept / state.n_prunable, "round")
        return phase_start

    def _restore_phase(self, state, ckpt, i: int, first: int, phase_start: float, progress) -> None:
        phase = self.plan[i]

        def on_step(j: int, d_j: float) -> None:
            if j == phase.length:  # theta <- theta_init * m, part of the last step
                state.reset_to_init()
            self._save(ckpt, state, i, j, phase_start)
            progress.step(phase.label, d_j)

        opts = self.options
        restore_masks(state.masks, self.density, phase.index, phase.length, seed=opts.seed,
                      noise_scale=opts.noise_scale, count=opts.count, n_all=state.n_all, start_step=first,
                      on_step=on_step, layouts=self.layouts)
        logger.debug("restoration %d reached density %g", phase.index, state.kept / state.n_prunable)

    def _score_round(self, state, mine, round_index: int, d_t: float, phase: str) -> int:
        """One round: score, sum across ranks, decay, select at d_t, theta <- theta * m.
        Returns the new kept count."""
        kept = state.kept
        ctx = state.context(round_index, self.options.seed, kept, self.scorer.needs_double_backward)
        owner = self._owner
        scores = compute_scores(self.scorer, ctx, mine, self.device, phase, owner)
        keep, mode = keep_count(d_t, state.n_prunable, state.n_all, self.options.count)
        if mode == "exact":
            keep = min(keep, kept)
        select_masks(self.scorer, ctx, scores, keep, mode, self.options.compression_factor, kept, state.n_prunable,
                     self.layouts, owner)
        return state.kept

    def _owners(self, state) -> Optional[List[int]]:
        """Owner rank of each prunable tensor with shard_scores under torch.distributed, else None."""
        if not (self.options.shard_scores and dist_utils.is_distributed()):
            return None
        from widetopo.distributed.owners import owners

        return owners([p.numel() for p in state.working], dist_utils.rank_world()[1])

    # ------------------------------------------------------------------ result
    def _result(self, state, world: int) -> Masks:
        from widetopo import __version__

        kept = state.kept
        meta = {
            "method": self.scorer.name,
            "preset": None,
            "target_density": self.density,
            "density": kept / state.n_prunable,
            **self.options.result_settings(),
            "data_split": self._split.mode,
            "world_size": world,
            "version": __version__,
        }
        meta.update(self.meta)
        result = Masks(OrderedDict(zip(self.names, state.masks)), meta, self.layouts,
                       model_blocks(self.model, self.names))
        collapsed = collapsed_parts(result)  # tensors, then q/k/v projections and heads with no weight
        tensors = [c for c in collapsed if c in result]
        parts = [c for c in collapsed if c not in result]
        if tensors:
            logger.warning("no weights kept in %d prunable tensor(s): %s", len(tensors), ", ".join(tensors))
        if parts:
            logger.warning("no weights kept in %d attention projection(s)/head(s) (the tensor keeps weights, "
                           "these blocks of it none): %s", len(parts), ", ".join(parts))
        logger.info("pruning done: kept %d of %d prunable weights (density %g)", kept, state.n_prunable,
                    kept / state.n_prunable)
        return result
