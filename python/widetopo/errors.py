"""Every exception a user of widetopo may want to catch, in one place.

Each derives from `WidetopoError`, so `except widetopo.WidetopoError` catches anything the
library raises on purpose, and also keeps the builtin base it always had (ValueError,
RuntimeError, FileNotFoundError), so existing `except ValueError:` code keeps working.
Bad arguments raise plain TypeError/ValueError naming the argument (see the design's
"bad input" rule); the classes here are the conditions a caller can act on.

The modules that raise them re-export them under their old names (widetopo.engine.rounds,
widetopo.sparsity.maskfile, ...), and `widetopo` exports them all.
"""
from __future__ import annotations

from typing import List

__all__ = [
    "WidetopoError",
    "NonFiniteScoresError",
    "ZeroScoresError",
    "NoiseScoresError",
    "DoubleBackwardError",
    "CheckpointMismatch",
    "MaskFileError",
    "MaskMismatchError",
    "DatasetNotFoundError",
    "InitMismatchError",
    "RecipeError",
    "CompareError",
    "RankMismatchError",
    "UnsupportedInputsError",
    "OutputLockedError",
]


class WidetopoError(Exception):
    """Base of every exception widetopo defines."""


# ------------------------------------------------------------------------------ pruning

class NonFiniteScoresError(WidetopoError, RuntimeError):
    """A scorer produced NaN or inf scores."""


class ZeroScoresError(WidetopoError, RuntimeError):
    """Every kept weight scored 0: any mask would be an arbitrary choice."""


class NoiseScoresError(ZeroScoresError):
    """The scores of some prunable tensor are rounding noise: the output they differentiate does
    not depend on its weights (mathematically the scores are 0, numerically they are not)."""


class DoubleBackwardError(WidetopoError, RuntimeError):
    """A module of the model has no second derivative, which the scoring method needs."""


class UnsupportedInputsError(WidetopoError, TypeError):
    """The method cannot act on the model's inputs or outputs as given (e.g. it perturbs the
    input, the inputs are token ids and no input embedding is found); the message names the
    option to use."""


class CheckpointMismatch(WidetopoError, ValueError):
    """The checkpoint file belongs to a different run."""


class RankMismatchError(WidetopoError, ValueError):
    """Under torch.distributed, the ranks were called with runs that cannot be pruned together
    (a different method, option, density, schedule, model or prunable selection; data that is not
    replicated under data_split="replicated"; samples of different shapes). Every rank raises
    it with the same message, before round 1; `differences` lists each disagreement."""

    def __init__(self, message: str, differences: List[str]):
        super().__init__(message)
        self.differences = differences


# ------------------------------------------------------------------------------ files

class MaskFileError(WidetopoError, ValueError):
    """The file is not a valid widetopo mask file (wrong magic, unsupported version, truncated,
    corrupted)."""


class MaskMismatchError(WidetopoError, ValueError):
    """The masks in a file do not fit the model they are loaded onto; `differences` lists
    each mismatch."""

    def __init__(self, message: str, differences: List[str]):
        super().__init__(message)
        self.differences = differences


class DatasetNotFoundError(WidetopoError, FileNotFoundError):
    """The data files of a dataset are not present; the message says how to get them."""


class InitMismatchError(WidetopoError, ValueError):
    """The state_dict in an init file does not fit the model (missing/unexpected keys, shapes)."""


class RecipeError(WidetopoError):
    """A setup that cannot work (model and dataset of different tasks, a changed --init file).
    Not a ValueError on purpose: `compare` stops on it instead of recording a refused cell."""


class CompareError(WidetopoError):
    """A problem with a comparison's setup or its journal (a damaged or foreign results.json)."""


class OutputLockedError(CompareError):
    """Another run holds the output directory's lock (DIR/.lock); `holder` is what it recorded
    ({"pid", "host", "started"}, {} when unreadable)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder
