"""The pruning loop (DESIGN 2): score -> all_reduce -> (decay) -> threshold -> theta <- theta * m,
over a density schedule, with repeated mask restoration.

The engine never modifies the caller's model: it works on detached copies of the parameters
(passed to the model with torch.func.functional_call), a private copy of the buffers that each
round's scorer gets afresh, and keeps theta_init for the restorations. Module attributes a
scorer touches (train/eval mode, BatchNorm momentum, hooks) are restored when the run ends,
and so is the global RNG. All mask arithmetic goes through the widetopo_ext ops.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

import widetopo_ext
from widetopo import distributed as dist_utils
from widetopo.checkpoint import Checkpoint
from widetopo.masks import Masks
from widetopo.params import select_prunable
from widetopo.restoration import restore_masks
from widetopo.schedule import COUNTS, _check_density, density_schedule, keep_count, schedule_kind
from widetopo.scores.base import Batch, ScoreContext, Scorer

logger = logging.getLogger(__name__)


def _score_dtype(p: torch.Tensor) -> torch.dtype:
    """Scores are summed, decayed and thresholded in float64 for float64 parameters, else in
    float32 (also for 16-bit models), so every process all-reduces the same dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class NonFiniteScoresError(RuntimeError):
    """A scorer produced NaN or inf scores."""


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


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def materialize_batches(data: Iterable, device: torch.device, max_samples: Optional[int] = None) -> List[Batch]:
    """Turn any iterable of tensors or (input, target[, ...]) batches into Batch objects on
    `device`, indexed 0, 1, ... in iteration order (the index seeds the batch's randomness).

    max_samples: read batches only until this many samples are collected (the last batch is
    cut to fit, and the iterator is not advanced further), so a full training DataLoader can
    be passed; None reads everything."""
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (e.g. a DataLoader or a list of tensors), not one tensor")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}") from None
    batches, taken = [], 0
    for index, item in enumerate(iterator):
        if isinstance(item, torch.Tensor):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
            x = item[0]
            y = item[1] if len(item) >= 2 else None
            if y is not None and not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
        else:
            raise TypeError(
                f"data: batch {index} is a {type(item).__name__}; each batch must be an input tensor "
                "or an (input, target) pair"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"data: batch {index} has no samples (input shape {tuple(x.shape)})")
        if max_samples is not None and taken + x.shape[0] > max_samples:
            cut = max_samples - taken
            x = x[:cut]
            y = y[:cut] if y is not None and y.dim() > 0 else y
        batches.append(Batch(index, x.to(device), None if y is None else y.to(device)))
        taken += x.shape[0]
        if max_samples is not None and taken >= max_samples:
            break
    if not batches:
        raise ValueError("data is empty: the pruning set must contain at least one batch")
    return batches


class Pruner:
    """Iterative global pruning with a pluggable scorer.

    Phases: T scoring rounds on the schedule from 1 to d*; then R times: a restoration of J
    steps (widetopo.restoration.restore_masks), theta <- theta_init * m, and T' scoring rounds
    geometric (or `schedule`) from the density reached back to d*.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: Scorer,
        density: float,
        names: Optional[Sequence[str]] = None,
        *,
        rounds: int = 1,
        restorations: int = 0,
        restore_steps: int = 50,
        restore_rounds: Optional[int] = None,
        schedule: str = "poly",
        compression_factor: float = 5.0,
        count: str = "exact",
        seed: int = 0,
        noise_scale: float = 1e-5,
        verbose: bool = True,
        max_samples: Optional[int] = None,
        checkpoint=None,
        device=None,
        meta: Optional[dict] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a widetopo.scores.Scorer, got {type(scorer).__name__}")
        self.density = _check_density("density", density)
        self.rounds = _check_int("rounds", rounds, 1)
        self.restorations = _check_int("restorations", restorations, 0)
        self.restore_steps = _check_int("restore_steps", restore_steps, 1)
        self.restore_rounds = _check_int("restore_rounds", self.rounds if restore_rounds is None else restore_rounds, 1)
        self.schedule = schedule_kind(schedule)
        if isinstance(compression_factor, bool) or not isinstance(compression_factor, (int, float)) or not (
            math.isfinite(compression_factor) and compression_factor > 0
        ):
            raise ValueError(f"compression_factor must be a finite number > 0, got {compression_factor!r}")
        self.compression_factor = float(compression_factor)
        if count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
        self.count = count
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not math.isfinite(noise_scale):
            raise ValueError(f"noise_scale must be a finite number, got {noise_scale!r}")
        self.noise_scale = float(noise_scale)
        if not isinstance(verbose, bool):
            raise TypeError(f"verbose must be True or False, got {verbose!r}")
        self.verbose = verbose
        self.max_samples = None if max_samples is None else _check_int("max_samples", max_samples, 1)
        self.checkpoint_path = checkpoint
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device or its name, got {device!r}") from None
        self.model = model
        self.scorer = scorer
        self.names = select_prunable(model) if names is None else select_prunable(model, names=list(names))
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ helpers
    def _phases(self) -> List[Tuple[str, int]]:
        """[("prune", 0), ("restore", 0), ("prune", 1), ("restore", 1), ...]."""
        out = [("prune", 0)]
        for r in range(self.restorations):
            out += [("restore", r), ("prune", r + 1)]
        return out

    def _phase_length(self, phase: Tuple[str, int]) -> int:
        kind, index = phase
        if kind == "restore":
            return self.restore_steps
        return self.rounds if index == 0 else self.restore_rounds

    def _rounds_before(self, phase_idx: int) -> int:
        phases = self._phases()
        return sum(self._phase_length(p) for p in phases[:phase_idx] if p[0] == "prune")

    def _settings(self) -> dict:
        """The run options that shape the result (in mask metadata and the checkpoint fingerprint)."""
        return {
            "seed": self.seed,
            "count": self.count,
            "rounds": self.rounds,
            "restorations": self.restorations,
            "restore_steps": self.restore_steps,
            "restore_rounds": self.restore_rounds,
            "schedule": self.schedule,
            "compression_factor": self.compression_factor,
            "noise_scale": self.noise_scale,
            "max_samples": self.max_samples,
        }

    def _fingerprint(self, params: dict, batches: List[Batch], world: int) -> dict:
        scorer_state = {
            k: v for k, v in sorted(vars(self.scorer).items()) if isinstance(v, (int, float, str, bool, type(None)))
        }
        checksum = sum(float(params[n].double().abs().sum()) for n in self.names)
        return {
            "scorer": f"{type(self.scorer).__module__}.{type(self.scorer).__qualname__}",
            "scorer_state": repr(scorer_state),
            "meta": repr(sorted((k, repr(v)) for k, v in self.meta.items())),
            "density": self.density,
            **self._settings(),
            "names": list(self.names),
            "shapes": [list(params[n].shape) for n in self.names],
            "theta_checksum": repr(checksum),
            "batches": [[b.index, list(b.x.shape)] for b in batches],
            "world": world,
        }

    # ------------------------------------------------------------------ run
    def run(self, data: Iterable) -> Masks:
        """Prune; returns the masks. The caller's model and the global RNG are left unchanged."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _ModuleStateGuard(self.model):
            return self._run(data)

    def _run(self, data: Iterable) -> Masks:
        model, device = self.model, self.device
        rank, world = dist_utils.rank_world()
        with dist_utils.fail_together(device, "reading the pruning data"):
            batches = materialize_batches(data, device, self.max_samples)
            if self.scorer.needs_targets and any(b.y is None for b in batches):
                raise ValueError(f"method {self.scorer.name!r} needs targets: data must yield (input, target) batches")

        # Private working state: parameter copies (theta * m lives here), buffers, theta_init.
        params = OrderedDict((n, p.detach().to(device, copy=True)) for n, p in model.named_parameters())
        buffers = OrderedDict((n, b.detach().to(device, copy=True)) for n, b in model.named_buffers())
        dist_utils.broadcast_(list(params.values()) + list(buffers.values()))
        with dist_utils.fail_together(device, "the model's forward on the pruning data"):
            with torch.no_grad():
                probe = functional_call(model.eval(), (params, buffers), (batches[0].x[:2],))
            if not isinstance(probe, torch.Tensor):
                raise TypeError(
                    f"model must return a logits tensor, got {type(probe).__name__}; wrap the model so "
                    "that forward(x) returns a tensor"
                )
        working = [params[n] for n in self.names]
        theta_init = [p.clone() for p in working]
        masks = [torch.ones(p.shape, dtype=torch.bool, device=device) for p in working]
        n_prunable = sum(p.numel() for p in working)
        n_all = sum(p.numel() for p in params.values())
        mine = dist_utils.shard(batches, rank, world) if self.scorer.data_dependent else batches

        phases = self._phases()
        phase_idx, step, phase_start = 0, 0, 1.0
        ckpt = None
        if self.checkpoint_path is not None:
            ckpt = Checkpoint(self.checkpoint_path, self._fingerprint(params, batches, world), writer=rank == 0)
            state = ckpt.load()
            if dist_utils.is_distributed():
                torch.distributed.barrier()
            if state is not None:
                phase_idx, step, phase_start = int(state["phase"]), int(state["step"]), float(state["phase_start"])
                with torch.no_grad():
                    for dst, src in zip(masks, state["masks"]):
                        dst.copy_(src)
                    for dst, src in zip(working, state["params"]):
                        dst.copy_(src)

        def save(phase_i: int, step_i: int, start: float) -> None:
            if ckpt is not None:
                ckpt.save(
                    {
                        "phase": phase_i,
                        "step": step_i,
                        "phase_start": start,
                        "masks": [m.cpu() for m in masks],
                        "params": [p.cpu() for p in working],
                    }
                )

        total = sum(self._phase_length(p) for p in phases)
        done = sum(self._phase_length(p) for p in phases[:phase_idx]) + step
        kept = int(widetopo_ext.mask_stats(masks)[:, 0].sum())
        logger.info(
            "pruning %d prunable weights in %d tensors to density %g with %s (%d steps, %d batch(es) on this process)",
            n_prunable, len(working), self.density, self.scorer.name, total, len(mine),
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=done,
            desc=f"prune {self.meta.get('method', self.scorer.name)}",
            disable=(not self.verbose) or not sys.stderr.isatty() or rank != 0,
            leave=False,
        )
        try:
            for phase_i in range(phase_idx, len(phases)):
                kind, index = phases[phase_i]
                length = self._phase_length(phases[phase_i])
                if phase_i != phase_idx:
                    step = 0
                if kind == "prune":
                    if step == 0:
                        phase_start = 1.0 if index == 0 else max(kept / n_prunable, self.density)
                    densities = density_schedule(self.density, length, self.schedule, start=phase_start)
                    first_round = self._rounds_before(phase_i)
                    for t in range(step + 1, length + 1):
                        tic = time.perf_counter()
                        kept = self._score_round(
                            model, params, buffers, working, masks, mine, first_round + t, densities[t - 1],
                            kept, n_prunable, n_all, f"prune {index}",
                        )
                        save(phase_i, t, phase_start)
                        bar.set_postfix(density=f"{kept / n_prunable:.4g}", phase=f"prune{index}",
                                        s_per_round=f"{time.perf_counter() - tic:.2f}")
                        bar.update(1)
                else:
                    tic = [time.perf_counter()]

                    def on_step(j: int, d_j: float, phase_i=phase_i, index=index, length=length) -> None:
                        if j == length:  # theta <- theta_init * m, part of the last step
                            with torch.no_grad():
                                torch._foreach_copy_(working, theta_init)
                            widetopo_ext.apply_masks_(working, masks)
                        save(phase_i, j, phase_start)
                        bar.set_postfix(density=f"{d_j:.4g}", phase=f"restore{index}",
                                        s_per_step=f"{time.perf_counter() - tic[0]:.3f}")
                        tic[0] = time.perf_counter()
                        bar.update(1)

                    restore_masks(
                        masks, self.density, index, length, seed=self.seed, noise_scale=self.noise_scale,
                        count=self.count, n_all=n_all, start_step=step, on_step=on_step,
                    )
                    kept = int(widetopo_ext.mask_stats(masks)[:, 0].sum())
                    logger.debug("restoration %d reached density %g", index, kept / n_prunable)
        finally:
            bar.close()

        result = Masks(OrderedDict(zip(self.names, masks)), self._result_meta(kept / n_prunable, world))
        collapsed = [n for n, row in zip(self.names, widetopo_ext.mask_stats(masks).tolist()) if row[0] == 0]
        if collapsed:
            logger.warning("no weights kept in %d prunable tensor(s): %s", len(collapsed), ", ".join(collapsed))
        logger.info("pruning done: kept %d of %d prunable weights (density %g)", kept, n_prunable, kept / n_prunable)
        return result

    def _result_meta(self, achieved: float, world: int) -> dict:
        from widetopo import __version__

        meta = {
            "method": self.scorer.name,
            "preset": None,
            "target_density": self.density,
            "density": achieved,
            **self._settings(),
            "world_size": world,
            "version": __version__,
        }
        meta.update(self.meta)
        return meta

    def _score_round(self, model, params, buffers, working, masks, mine, round_index, d_t, kept,
                     n_prunable, n_all, phase) -> int:
        """One round: score, sum across ranks, decay, threshold at d_t, theta <- theta * m.
        Returns the new kept count."""
        density_now = kept / n_prunable
        ctx = ScoreContext(
            model=model,
            names=list(self.names),
            params=params,
            buffers=OrderedDict((n, b.clone()) for n, b in buffers.items()),
            masks=masks,
            round=round_index,
            seed=self.seed,
            density=density_now,
        )
        with dist_utils.fail_together(self.device, f"scoring round {round_index} ({phase})"):
            if mine:
                scores = self._check_scores(self.scorer.score(ctx, mine), working)
            else:  # more processes than batches: this rank contributes nothing to the sum
                scores = [torch.zeros(p.shape, dtype=_score_dtype(p), device=p.device) for p in working]
        if self.scorer.data_dependent:
            dist_utils.all_reduce_sum_(scores)
        scores = self._check_scores(self.scorer.finalize(ctx, scores), working)
        finite = torch.stack([torch.isfinite(s).all() for s in scores])
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteScoresError(
                f"scorer {self.scorer.name!r} produced non-finite (NaN or inf) scores for layer "
                f"{self.names[bad]!r} in round {round_index} ({phase})"
            )
        if self.scorer.decay and kept > 0:  # (kept == 0: everything is pruned already)
            widetopo_ext.density_decay_(scores, masks, -math.log10(density_now) / self.compression_factor)
        self._protect_pruned(scores, masks, kept < n_prunable)
        keep, mode = keep_count(d_t, n_prunable, n_all, self.count)
        if mode == "exact":
            keep = min(keep, kept)
        widetopo_ext.global_threshold(scores, masks, keep, mode)
        widetopo_ext.apply_masks_(working, masks)
        return int(widetopo_ext.mask_stats(masks)[:, 0].sum())

    def _check_scores(self, scores, working) -> List[torch.Tensor]:
        if not isinstance(scores, (list, tuple)) or len(scores) != len(working):
            raise TypeError(
                f"scorer {self.scorer.name!r} must return a list of {len(working)} score tensors "
                f"(one per prunable parameter), got {type(scores).__name__}"
                + (f" of length {len(scores)}" if isinstance(scores, (list, tuple)) else "")
            )
        out = []
        for name, s, p in zip(self.names, scores, working):
            if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.shape != p.shape:
                raise TypeError(
                    f"scorer {self.scorer.name!r}: the score of {name!r} must be a floating tensor of shape "
                    f"{tuple(p.shape)}, got {getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}"
                )
            s = s.detach()
            if s.device != p.device or s.dtype != _score_dtype(p):
                s = s.to(device=p.device, dtype=_score_dtype(p))
            if not s.is_contiguous() or s.data_ptr() == p.data_ptr():
                s = s.contiguous() if s.data_ptr() != p.data_ptr() else s.clone()
            out.append(s)
        return out

    @staticmethod
    def _protect_pruned(scores: List[torch.Tensor], masks: List[torch.Tensor], any_pruned: bool) -> None:
        """Give pruned entries the lowest finite score and every kept entry a strictly higher
        one, so no threshold (with any tie rule) can revive a pruned weight - even when kept
        weights score 0 like the pruned ones. (Kept scores below finfo.min/2 are clamped there.)"""
        if not any_pruned:
            return
        by_dtype = {}
        for s in scores:
            by_dtype.setdefault(s.dtype, []).append(s)
        for dtype, group in by_dtype.items():
            torch._foreach_clamp_min_(group, torch.finfo(dtype).min / 2)
        for s, m in zip(scores, masks):
            s.masked_fill_(m.logical_not(), torch.finfo(s.dtype).min)
