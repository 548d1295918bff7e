"""Reproducible randomness: every random draw of a pruning run comes from a generator seeded
by (seed, round, batch index), never from the global RNG, so masks do not depend on how the
batches are split across processes or on what else the caller's program draws."""
import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across Python runs and platforms)."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def make_generator(seed: int, round_index: int, batch_index: int, device="cpu", stream: int = 0) -> torch.Generator:
    """Generator for one (seed, round, batch) cell; `stream` separates independent draws
    (e.g. probes vs. perturbations) within that cell."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(derive_seed(seed, round_index, batch_index, stream))
    return gen
