"""Which synthetic samples a device asks for, given its planned amount: the one rule that the
planner (to show `class_gen`) and the device (to make its request) both apply.

  fimi and the other policies: [FIMI eq. 47] water-filling toward a uniform local histogram
  hdc: everything for the class the device holds least of (the HDC baseline)
  fimi-uniform: the same amount for every class (the "w/o OA" ablation of [FIMI Fig. 5e])

The device applies it to its own class histogram, which never leaves it.
"""

from __future__ import annotations

import numpy as np


def augmentation_policy(class_counts, d_gen: float) -> np.ndarray:
    """Whole samples per class that bring the local histogram closest to uniform ([FIMI Thm. 3]).

    [FIMI eq. 47]'s water level pi with d_c = [pi - n_c] clipped to [0, D_gen]; whole samples are
    handed out by flooring at the level and giving the remainder to the emptiest classes,
    which is exactly greedy one-sample-at-a-time filling and so maximises the entropy.
    """
    counts = np.asarray(class_counts, dtype=float)
    total = int(round(float(d_gen)))
    if total <= 0:
        return np.zeros(counts.size, dtype=np.int64)
    lo, hi = counts.min(), counts.max() + total
    for _ in range(200):  # bisection on the water level pi
        level = 0.5 * (lo + hi)
        if np.clip(level - counts, 0, total).sum() > total:
            hi = level
        else:
            lo = level
    gen = np.floor(np.clip(lo - counts, 0, total)).astype(np.int64)
    for _ in range(total - int(gen.sum())):
        gen[np.argmin(counts + gen)] += 1
    return gen


def synthetic_request(policy: str, class_counts, d_gen: float) -> np.ndarray:
    """Whole synthetic samples per class for a device under `policy`."""
    counts = np.asarray(class_counts)
    total = max(0, int(round(float(d_gen))))
    if policy == "hdc":
        request = np.zeros(counts.size, dtype=np.int64)
        request[np.argmin(counts)] = total
        return request
    if policy == "fimi-uniform":  # the remainder to the classes held least, as [FIMI eq. 47] would
        request = np.full(counts.size, total // counts.size, dtype=np.int64)
        request[np.argsort(counts, kind="stable")[:total % counts.size]] += 1
        return request
    return augmentation_policy(class_counts, d_gen)
