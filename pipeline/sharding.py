"""Per-epoch shuffling, rank sharding and per-sample seeds, shared by the backends that index samples themselves."""
from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The dataset order of one epoch: identical on every rank (same `seed`), different per epoch."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


def rank_indices(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 shuffle: bool = True) -> np.ndarray:
    """The dataset indices rank `rank` visits in `epoch`, in order, a whole number of batches long.

    The epoch's permutation is cut to `num_batches * batch_size * world_size` samples (drop_last over the global
    batch: every rank runs the same number of steps, so collectives never wait on a rank that ran out), then dealt
    round-robin: rank r takes positions r, r + W, r + 2W, ... The ranks' shares are disjoint and together cover the
    kept samples; at most `batch_size * world_size - 1` samples are left out per epoch, a different set each epoch.
    """
    per_step = batch_size * world_size
    kept = (num_samples // per_step) * per_step
    perm = epoch_permutation(num_samples, seed, epoch, shuffle)[:kept]
    return perm[rank::world_size]


def num_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch on each rank under `rank_indices`."""
    return num_samples // (batch_size * world_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, independent of worker count, batch position and resume point."""
    return mix_seed(seed, epoch, index)


def rank_seed(seed: int, rank: int) -> int:
    """A rank's own 63-bit stream seed: mixed, so that (seed 1, rank 0) draws nothing of (seed 0, rank 1)."""
    return mix_seed(seed, rank)


def mix_seed(*xs: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): cheap, well spread, stable across platforms."""
    h = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for x in xs:
        h = (h ^ (x & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        h = z ^ (z >> 31)
    return h >> 1
