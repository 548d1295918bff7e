"""Optional run checkpoint: resume a killed pruning run where it stopped.

After every scoring round and every restoration step the engine writes {phase index, step
within the phase, the phase's start density, masks, working prunable weights} atomically
(temporary file + os.replace), together with a fingerprint of everything that determines the
result (method, options, parameter names/shapes, a digest of every parameter and buffer of the model,
the pruning data's digest and the batches' shapes).
A run started with the same path resumes if the fingerprint matches; otherwise it refuses.
Randomness needs no state: every draw is seeded by (seed, round, batch index).
"""
from __future__ import annotations

import io
import logging
import os
from typing import Optional

import torch

from widetopo.files import atomic_write

from widetopo.errors import CheckpointMismatch  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

FORMAT = 1


class Checkpoint:
    """One checkpoint file. Only `writer` processes write (rank 0 under torch.distributed)."""

    def __init__(self, path, fingerprint: dict, writer: bool = True):
        self.path = os.fspath(path)
        self.fingerprint = dict(fingerprint)
        self.writer = writer

    def check_writable(self) -> None:
        """Fail before the first round if the checkpoint could not be written."""
        if not self.writer:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint {self.path!r}: folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(self.path) and not os.access(self.path, os.W_OK)):
            raise ValueError(f"checkpoint {self.path!r} cannot be written (no write permission)")
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint {self.path!r} is a folder; give a file path")

    def load(self) -> Optional[dict]:
        """The saved state, or None when there is no file. Raises CheckpointMismatch for a
        file written by a different run, ValueError for an unreadable one."""
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated/corrupt file; torch's own advice (weights_only=False) does not apply
            raise ValueError(
                f"checkpoint {self.path!r} cannot be read: the file is truncated or is not a widetopo "
                f"checkpoint ({type(exc).__name__}); delete it to start over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"checkpoint {self.path!r} is not a widetopo checkpoint (format {FORMAT})")
        saved = state.get("fingerprint", {})
        if saved != self.fingerprint:
            keys = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise CheckpointMismatch(
                f"checkpoint {self.path!r} was written by a different run (differs in: {', '.join(keys)}); "
                "delete it or choose another checkpoint path"
            )
        logger.info("resuming from checkpoint %s (phase %s, step %s)", self.path, state["phase"], state["step"])
        return state

    def save(self, state: dict) -> None:
        """Write atomically: a reader sees the previous complete file or the new one."""
        if not self.writer:
            return
        full = dict(state)
        full["format"] = FORMAT
        full["fingerprint"] = self.fingerprint
        buffer = io.BytesIO()  # serialise first, so a failed write is a plain OSError with its errno
        torch.save(full, buffer)
        atomic_write(self.path, buffer.getbuffer(), "checkpoint")
