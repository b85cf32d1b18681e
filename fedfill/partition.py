"""Dirichlet non-IID partition of the clients' pool ([FIMI §V-A]: Dir(0.4) / Dir(0.6)).

The usual label-skew recipe (FedMA, NIID-Bench, Flower Datasets' DirichletPartitioner): for
each class, draw the shares of the partitions from Dir(alpha) and deal that class's samples
out accordingly. Small alpha gives each device few classes, large alpha approaches IID.

With self-balancing (as in those tools) a partition that already holds its fair share N/P
gets no more of the later classes, which keeps sizes from running away. A draw whose
smallest partition is below `min_size` is redrawn (up to `max_draws` times); if that keeps
failing (tiny alpha, many partitions), the last draw is repaired by moving random samples
from the largest partitions to the short ones, so the guarantee always holds. Everything
comes from one `numpy.random.Generator(seed)`: the same arguments give the same partition.
"""

from __future__ import annotations

import numpy as np


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0, *,
                        min_size: int = 10, self_balancing: bool = True, max_draws: int = 20) -> list[np.ndarray]:
    """Indices into `labels` for each partition: every index exactly once, each partition at
    least `min_size` long, class mix skewed by Dir(alpha)."""
    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1 or n == 0:
        raise ValueError("labels must be a non-empty 1-D array")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0 or min_size * num_partitions > n:
        raise ValueError(f"cannot give {num_partitions} partitions at least {min_size} samples each "
                         f"from {n} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max(1, max_draws)):
        parts = _draw(labels, classes, num_partitions, alpha, self_balancing, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        parts = _repair(parts, min_size, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _draw(labels, classes, num_partitions, alpha, self_balancing, rng) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    fair_share = len(labels) / num_partitions
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        if self_balancing:
            open_parts = np.array([len(p) < fair_share for p in parts])
            if open_parts.any():
                shares = shares * open_parts
        total = shares.sum()
        # Dir(alpha) with tiny alpha can underflow to all zeros: fall back to uniform shares.
        shares = shares / total if total > 0 else np.full(num_partitions, 1.0 / num_partitions)
        cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return parts


def _repair(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Move random samples from the largest partition to the smallest until all reach min_size."""
    parts = [list(p) for p in parts]
    sizes = np.array([len(p) for p in parts])
    while sizes.min() < min_size:
        small, large = int(sizes.argmin()), int(sizes.argmax())
        move = min(min_size - sizes[small], sizes[large] - min_size)
        donor = parts[large]
        taken = set(rng.choice(len(donor), size=move, replace=False).tolist())
        parts[small].extend(donor[i] for i in sorted(taken))
        parts[large] = [x for i, x in enumerate(donor) if i not in taken]
        sizes[small] += move
        sizes[large] -= move
    return parts


def partition_class_counts(labels: np.ndarray, partitions: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """[num_partitions, num_classes] sample counts: what each device holds per class."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partitions]) if partitions \
        else np.zeros((0, num_classes), dtype=np.int64)


def label_skew(class_counts: np.ndarray) -> float:
    """Mean total-variation distance between each partition's label distribution and the
    pool's: 0 for IID partitions, approaching 1 - 1/C when each holds one class."""
    counts = np.asarray(class_counts, dtype=float)
    sizes = counts.sum(axis=1, keepdims=True)
    local = counts / np.maximum(sizes, 1)
    pool = counts.sum(axis=0) / counts.sum()
    return float(np.mean(0.5 * np.abs(local - pool).sum(axis=1)))
