"""Start from given weights: load a state_dict file into a model before pruning (`--init FILE`).

Pruning at initialization usually prunes a fresh Kaiming initialization, but a user may want
to prune a specific initialization (shared with another code base) or a pretrained network.
The file is a torch.save of a state_dict, or of a checkpoint dict holding one under a usual
key ("state_dict", "model_state_dict", "model", "net", "network"). It is read with
weights_only=True, so loading never runs code from the file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from typing import Mapping

import torch
from torch import nn

from widetopo.errors import InitMismatchError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

__all__ = ["load_init", "file_sha256", "InitMismatchError", "STATE_KEYS"]

#: Keys under which checkpoint dicts commonly hold the model's state_dict, tried in order.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes (recorded in mask metadata to detect a changed file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe_message(path: str, torch_message: str) -> str:
    """Our own words for torch.load's weights_only refusal (whose advice, to load with
    weights_only=False, would run the file's code): what the file holds and what to save instead."""
    found = sorted(set(_GLOBAL.findall(_ANSI.sub("", torch_message))))
    what = f" (it refers to {', '.join(found[:5])})" if found else ""
    return (f"init file {path!r} holds Python objects beyond tensors{what}, which could run code when loaded; "
            f"widetopo reads init files with weights_only=True and never executes them. Save the weights "
            f"as a plain state_dict: torch.save(model.state_dict(), path), with torch tensors (not numpy arrays)")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path) -> dict:
    """The state_dict stored in `path` (plain, or under one of STATE_KEYS of a checkpoint dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and _GLOBAL.search(_ANSI.sub("", str(exc))):
            raise ValueError(_unsafe_message(path, str(exc))) from None
        first = _ANSI.sub("", str(exc)).strip().splitlines()
        raise ValueError(f"init file {path!r} is not a torch.save file of tensors ({type(exc).__name__}"
                         f"{': ' + first[0] if first else ''})") from None
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = sorted(map(str, obj))[:10]
        raise ValueError(f"init file {path!r} holds a dict without a state_dict: expected tensors keyed by "
                         f"parameter name, or a state_dict under one of {list(STATE_KEYS)}; found keys {keys}")
    raise ValueError(f"init file {path!r} holds a {type(obj).__name__}, not a state_dict")


def load_init(model: nn.Module, path) -> dict:
    """Load the state_dict in `path` into `model` (strict: every key, every shape).

    Everything is checked before the model is touched; a mismatch raises InitMismatchError
    listing the missing keys, the unexpected keys and the shape mismatches. Returns
    {"init_file": absolute path, "init_sha256": checksum} for the mask metadata.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        raise InitMismatchError(f"init file {os.fspath(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    logger.info("loaded initial weights from %s", os.fspath(path))
    return {"init_file": os.path.abspath(os.fspath(path)), "init_sha256": file_sha256(path)}
