"""One seed scheme: keyed streams are reproducible and independent of their neighbours."""
from __future__ import annotations

import numpy as np
import torch

from meddino_common.seeding import derive_seed, seed_everything, seeded_rng


def test_keyed_streams_are_reproducible_and_distinct():
    assert np.array_equal(seeded_rng(0, 1).integers(0, 1 << 30, 8), seeded_rng(0, 1).integers(0, 1 << 30, 8))
    assert not np.array_equal(seeded_rng(0, 1).integers(0, 1 << 30, 8), seeded_rng(0, 2).integers(0, 1 << 30, 8))
    assert derive_seed(3, 4) == derive_seed(3, 4) != derive_seed(3, 5)
    assert 0 <= derive_seed(3, 4) < 2**63


def test_seed_everything_seeds_torch_and_numpy():
    seed_everything(7)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
