"""The pruning progress bar (tqdm, shown on a terminal, on rank 0 only)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()),
                        leave=False)
        self.tic = time.perf_counter()

    def step(self, phase: str, density: float, unit: str = "step") -> None:
        """One scoring round (unit "round") or restoration step done; show its time."""
        now = time.perf_counter()
        self.bar.set_postfix({"density": f"{density:.4g}", "phase": phase, f"s_per_{unit}": f"{now - self.tic:.3g}"})
        self.tic = now
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
