"""The pruning progress (rank 0 only): a tqdm bar on a terminal; elsewhere (a log file, a batch
job, CI) one log line every `every` percent, so a long run is never silent."""
from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("widetopo.progress")


class Progress:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every: float = 10.0):
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and tty), leave=False)
        self.log_lines = enabled and not tty
        self.total, self.done, self.desc, self.every = total, initial, desc, every
        self.logged = self._bucket(initial)
        self.tic = self.start = time.perf_counter()

    def _bucket(self, done: int) -> int:
        return int(100.0 * done / self.total // self.every) if self.total else 0

    def step(self, phase: str, density: float, unit: str = "step") -> None:
        """One scoring round (unit "round") or restoration step done; show its time."""
        now = time.perf_counter()
        self.bar.set_postfix({"density": f"{density:.4g}", "phase": phase, f"s_per_{unit}": f"{now - self.tic:.3g}"})
        self.tic = now
        self.bar.update(1)
        self.done += 1
        if self.log_lines and self._bucket(self.done) > self.logged:
            self.logged = self._bucket(self.done)
            logger.info("%s: %d/%d (%.0f%%), phase %s, density %.4g, %.1f s", self.desc, self.done, self.total,
                        100.0 * self.done / self.total, phase, density, now - self.start)

    def close(self) -> None:
        self.bar.close()
