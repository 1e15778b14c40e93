"""One seed-derivation scheme for the whole project.

Every random stream is keyed by integers (a base seed and tags such as rank, worker, epoch, case index) through
NumPy's ``SeedSequence``, which mixes the key so that neighbouring keys give independent streams. Torch and the
Python ``random`` module are seeded from the same derivation, so a run is reproducible from one ``seed``.
"""
from __future__ import annotations

import random
import numpy as np


def seeded_rng(*key: int) -> np.random.Generator:
    """An independent PCG64 stream for an integer key ``(seed, tag, ...)``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def derive_seed(*key: int) -> int:
    """A 63-bit integer seed for ``key`` (for libraries that take an int: torch generators, DataLoader workers)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global stream and torch (CPU and every GPU) from ``seed``."""
    import torch  # here, not at the top: curation imports this module for seeded_rng alone

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
