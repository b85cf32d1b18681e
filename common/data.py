"""Datasets as plain uint8 arrays, and the fixed public / client / test split of a dataset.

Every consumer (generator training, learning-curve fitting, client partitions, central
evaluation) takes its share from `split_dataset`, so the public data that trains the
generator never overlaps the clients' data or the test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 [N, H, W, C] (0..255) with int64 labels [N] in 0..num_classes-1."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        return ImageDataset(self.images[indices], self.labels[indices], self.class_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def load_digits() -> ImageDataset:
    """scikit-learn's handwritten digits (1797 8x8 grey images), the embedded default.

    The 0..16 intensities are scaled to 0..255 so every dataset shares one pixel range.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return ImageDataset(images, bunch.target.astype(np.int64), tuple(str(c) for c in range(10)))


@dataclass(frozen=True)
class DatasetSplit:
    public: ImageDataset  # server side: generator training and learning-model fitting
    clients: ImageDataset  # pool that the Dirichlet partitioner hands out to devices
    test: ImageDataset  # central evaluation only


def split_dataset(ds: ImageDataset, public_fraction: float = 0.25, test_fraction: float = 0.2,
                  seed: int = 0) -> DatasetSplit:
    """Stratified three-way split; the same seed always gives the same split."""
    if not (0 < public_fraction < 1 and 0 < test_fraction < 1 and public_fraction + test_fraction < 1):
        raise ValueError("public_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"public": [], "clients": [], "test": []}
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        n_pub = int(round(public_fraction * len(idx)))
        n_test = int(round(test_fraction * len(idx)))
        parts["public"].append(idx[:n_pub])
        parts["test"].append(idx[n_pub:n_pub + n_test])
        parts["clients"].append(idx[n_pub + n_test:])
    return DatasetSplit(**{k: ds.subset(np.sort(np.concatenate(v))) for k, v in parts.items()})
