"""Portable mask files: bit-packed masks plus the metadata needed to trust and reuse them.

Layout (all integers little-endian):

    magic          8 bytes   b"\\x89WTMASK\\n"
    format version 4 bytes   uint32 (FORMAT_VERSION)
    header length  8 bytes   uint64, length H of the JSON header
    header         H bytes   UTF-8 JSON: entries (name, shape, kept, offset, nbytes; and, when
                             the masks carry them, layout = [groups, transposed, elementwise]
                             of widetopo.sparsity.topology.UnitLayout and blocks = the
                             projections/heads of widetopo.sparsity.blocks as [label, dim,
                             start, stop, head]), meta, package version, payload length
    payload        P bytes   for each entry, numpy.packbits(mask.flatten(), bitorder="little")
    checksum      32 bytes   SHA-256 of every byte before it

A mask file is a plain container (no pickle): loading never executes code, and a truncated or
corrupted file is rejected by the length fields and the checksum instead of yielding masks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from widetopo.files import atomic_write
from widetopo.errors import MaskFileError, MaskMismatchError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

MAGIC = b"\x89WTMASK\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_CHECKSUM_BYTES = 32
_MAX_HEADER_BYTES = 64 * 1024 * 1024


def _package_version() -> str:
    try:
        from widetopo import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - only when the package is half installed
        return "unknown"


def _jsonable(value, key: str):
    """Metadata as plain JSON types; anything else is an error naming the key."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return repr(value)  # JSON has no inf/nan; keep them readable
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item(), key)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(
        f"meta[{key!r}] has type {type(value).__name__}, which a mask file cannot store; "
        "allowed: None, bool, int, float, str, and lists/dicts of those"
    )


def _check_masks(masks) -> Dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool tensor (e.g. widetopo.Masks), got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"mask names must be non-empty strings, got {name!r}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks[{name!r}] must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must have dtype torch.bool, got {mask.dtype}")
        out[name] = mask
    return out


def save_masks(masks, path, meta: Optional[dict] = None) -> None:
    """Write `masks` (name -> bool tensor) to `path` as a bit-packed, checksummed mask file.

    Metadata stored: each mask's name, shape and kept count; the overall density; the masks'
    own `.meta` (method, preset, seed, ...) updated with `meta`; the package and format
    versions. The file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under `path`.
    """
    tensors = _check_masks(masks)
    merged = dict(getattr(masks, "meta", None) or {})
    if meta is not None:
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        merged.update(meta)
    merged = {str(k): _jsonable(v, str(k)) for k, v in merged.items()}

    entries, chunks, offset, kept_total, numel_total = [], [], 0, 0, 0
    layouts = getattr(masks, "layouts", None)
    layouts = dict(zip(tensors, layouts)) if layouts is not None and len(layouts) == len(tensors) else {}
    split = getattr(masks, "blocks", None) or {}
    for name, mask in tensors.items():
        flat = mask.detach().to("cpu").contiguous().reshape(-1).numpy()
        packed = np.packbits(flat, bitorder="little").tobytes()
        kept = int(flat.sum())
        entries.append({"name": name, "shape": list(mask.shape), "kept": kept, "offset": offset, "nbytes": len(packed)})
        if name in layouts:  # the unit topology, so a report without the model reads the same units
            lay = layouts[name]
            entries[-1]["layout"] = [int(lay.groups), bool(lay.transposed), bool(lay.elementwise)]
        if split.get(name):
            entries[-1]["blocks"] = [b.to_list() for b in split[name]]
        chunks.append(packed)
        offset += len(packed)
        kept_total += kept
        numel_total += flat.size
    header = {
        "format": "widetopo-masks",
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "bitorder": "little",
        "density": kept_total / numel_total if numel_total else 1.0,
        "kept": kept_total,
        "numel": numel_total,
        "payload_bytes": offset,
        "entries": entries,
        "meta": merged,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + b"".join(chunks)
    data = body + hashlib.sha256(body).digest()

    path = os.fspath(path)
    atomic_write(path, data, "mask file")
    logger.info("saved %d masks (density %.4f) to %s (%d bytes)", len(entries), header["density"], path, len(data))


def read_header(path) -> dict:
    """The verified JSON header of a mask file (entries and metadata, no masks)."""
    header, _ = _read_verified(path)
    return header


def _read_verified(path):
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    where = f"{path!r}"
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise MaskFileError(f"{where} is not a widetopo mask file (bad magic header)")
    if len(data) < _PREFIX.size:
        raise MaskFileError(f"{where} is truncated ({len(data)} bytes, shorter than the fixed header)")
    _, version, header_len = _PREFIX.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise MaskFileError(
            f"{where} has mask file format version {version}; this widetopo ({_package_version()}) "
            f"reads version {FORMAT_VERSION}"
        )
    if header_len > _MAX_HEADER_BYTES or _PREFIX.size + header_len + _CHECKSUM_BYTES > len(data):
        raise MaskFileError(f"{where} is truncated or corrupted (header length {header_len} does not fit the file of {len(data)} bytes)")
    body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != checksum:
        raise MaskFileError(f"{where} is corrupted or truncated (SHA-256 checksum mismatch)")
    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # checksum passed: written wrongly
        raise MaskFileError(f"{where} has an unreadable header: {exc}") from None
    payload = body[_PREFIX.size + header_len :]
    if not isinstance(header, dict) or header.get("format") != "widetopo-masks" or not isinstance(header.get("entries"), list):
        raise MaskFileError(f"{where} has a header that is not a widetopo mask header")
    if header.get("payload_bytes") != len(payload):
        raise MaskFileError(f"{where} payload is {len(payload)} bytes, header says {header.get('payload_bytes')}")
    return header, payload


def _default_prunable(model: nn.Module) -> List[str]:
    """Names the engine prunes by default (weights of Conv*d and Linear layers)."""
    try:
        from widetopo.sparsity.selection import select_prunable
    except ImportError:  # pragma: no cover - the engine's module is part of the package
        select_prunable = None
    if select_prunable is not None:
        try:
            return list(select_prunable(model))
        except ValueError:  # the model has no Conv/Linear weights at all
            return []
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules() if isinstance(mod, kinds) and isinstance(getattr(mod, "weight", None), nn.Parameter)]


def check_masks_fit(model: nn.Module, shapes: Mapping[str, Iterable[int]], strict: bool = True, source: str = "masks") -> None:
    """Raise MaskMismatchError listing every difference between mask names/shapes and `model`.

    Differences: a mask whose name is not a parameter of the model; a mask whose shape differs
    from its parameter; and (strict) a default-prunable parameter (Conv/Linear weight) of the
    model with no mask - e.g. masks of ResNet-20 loaded onto ResNet-32.
    """
    params = dict(model.named_parameters())
    diffs = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if name not in params:
            hint = " (the model is already in torch.nn.utils.prune form; call remove_masks first)" if f"{name}_orig" in params else ""
            diffs.append(f"unexpected: {name!r} {list(shape)} is not a parameter of the model{hint}")
        elif tuple(params[name].shape) != shape:
            diffs.append(f"wrong shape: {name!r} is {list(shape)} in the {source}, {list(params[name].shape)} in the model")
    if strict:
        for name in _default_prunable(model):
            if name not in shapes and name in params:
                diffs.append(f"missing: the model's prunable parameter {name!r} {list(params[name].shape)} has no mask")
    if diffs:
        raise MaskMismatchError(
            f"{source} do not fit {type(model).__name__} ({len(diffs)} difference(s)):\n  " + "\n  ".join(diffs)
            + ("\n(pass strict=False to allow prunable parameters without a mask)" if strict and any(d.startswith("missing") for d in diffs) else ""),
            diffs,
        )


def load_masks(path, model: Optional[nn.Module] = None, strict: Optional[bool] = None):
    """Read a mask file written by save_masks and return widetopo.Masks.

    With `model`, every mask is checked against the model's parameters (see check_masks_fit;
    all differences are reported together) and placed on the device of its parameter.
    strict (default: True unless the file's meta records a custom prunable "selection")
    also requires a mask for every default-prunable parameter of the model.
    `.meta` holds the stored metadata plus "density", "package_version" and "format_version".
    """
    from widetopo.sparsity.masks import Masks

    from widetopo.sparsity.blocks import Block
    from widetopo.sparsity.topology import UnitLayout

    header, payload = _read_verified(path)
    shapes, tensors, layouts, split = {}, {}, {}, {}
    for i, entry in enumerate(header["entries"]):
        try:
            name, shape, offset, nbytes = entry["name"], [int(s) for s in entry["shape"]], int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise MaskFileError(f"{os.fspath(path)!r}: entry {i} of the header is malformed") from None
        numel = math.prod(shape)
        if any(s < 0 for s in shape) or nbytes != (numel + 7) // 8 or offset < 0 or offset + nbytes > len(payload):
            raise MaskFileError(f"{os.fspath(path)!r}: entry {name!r} has inconsistent shape/offset/size")
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, count=nbytes, offset=offset), count=numel, bitorder="little")
        mask = torch.from_numpy(bits.astype(np.bool_)).reshape(shape)
        if "kept" in entry and int(mask.sum()) != int(entry["kept"]):
            raise MaskFileError(f"{os.fspath(path)!r}: entry {name!r} holds {int(mask.sum())} kept weights, header says {entry['kept']}")
        shapes[name] = shape
        tensors[name] = mask
        try:
            if "layout" in entry:
                groups, transposed, elementwise = entry["layout"]
                layouts[name] = UnitLayout(int(groups), bool(transposed), bool(elementwise))
            if "blocks" in entry:
                split[name] = [Block.from_list(b) for b in entry["blocks"]]
        except (TypeError, ValueError):
            raise MaskFileError(f"{os.fspath(path)!r}: entry {name!r} has a malformed layout or blocks") from None
    if model is not None:
        if strict is None:
            strict = "selection" not in (header.get("meta") or {})
        check_masks_fit(model, shapes, strict=bool(strict), source=f"masks in {os.fspath(path)!r}")
        params = dict(model.named_parameters())
        tensors = {n: m.to(params[n].device) for n, m in tensors.items()}
    meta = dict(header.get("meta") or {})
    meta.setdefault("density", header.get("density"))
    meta["package_version"] = header.get("package_version")
    meta["format_version"] = header.get("format_version")
    logger.info("loaded %d masks (density %.4f) from %s", len(tensors), header.get("density", float("nan")), os.fspath(path))
    carried = [layouts[n] for n in tensors] if len(layouts) == len(tensors) and tensors else None
    return Masks(tensors, meta=meta, layouts=carried, blocks=split or None)
