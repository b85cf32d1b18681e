"""Is the generator any good? Measured, not assumed.

A reference classifier trained on real data the generator never saw (the clients' pool)
says whether generated samples look like their class (fidelity per class), its hidden layer
gives a feature space for a Fréchet distance between generated and real test images, and
nearest-neighbour distances to the generator's own training images tell novel samples from
copies (a real held-out image is the yardstick).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


class ReferenceClassifier:
    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed)
        self.model.fit(self._flat(images), labels)

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float64) / 255.0

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(self._flat(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.maximum(self._flat(images) @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    live = (a.std(0) > 0) | (b.std(0) > 0)  # ReLU units dead in both sets only make the covariance singular
    a, b = a[:, live], b[:, live]
    mu_a, mu_b = a.mean(0), b.mean(0)
    offset = 1e-6 * np.eye(a.shape[1])  # units constant in one set leave its covariance singular
    cov_a, cov_b = np.cov(a, rowvar=False) + offset, np.cov(b, rowvar=False) + offset
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * np.real(root)))


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    q = queries.reshape(len(queries), -1).astype(np.float64)
    r = references.reshape(len(references), -1).astype(np.float64)
    squared = (q ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None, :] - 2.0 * q @ r.T
    return np.sqrt(np.maximum(squared.min(1), 0.0))


def within_class_spread(images: np.ndarray, labels: np.ndarray) -> float:
    """Median distance between two images of the same class: low means the samples repeat."""
    spreads = []
    for c in np.unique(labels):
        x = images[labels == c].reshape(int(np.sum(labels == c)), -1).astype(np.float64)
        if len(x) > 1:
            d = np.sqrt(np.maximum((x ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None, :] - 2 * x @ x.T, 0))
            spreads.append(np.median(d[np.triu_indices(len(x), 1)]))
    return float(np.median(spreads))


def evaluate_generator(generated: np.ndarray, generated_labels: np.ndarray, split, seed: int = 0) -> dict:
    """Fidelity per class, Fréchet distance and copy check against a DatasetSplit."""
    reference = ReferenceClassifier(split.clients.images, split.clients.labels, seed)
    predicted = reference.predict(generated)
    classes = split.test.num_classes
    fidelity = {int(c): float(np.mean(predicted[generated_labels == c] == c))
                for c in range(classes) if np.any(generated_labels == c)}
    real_nn = nearest_distances(split.test.images, split.public.images)
    gen_nn = nearest_distances(generated, split.public.images)
    return {
        "reference_accuracy_on_real_test": float(np.mean(reference.predict(split.test.images) == split.test.labels)),
        "fidelity": float(np.mean(predicted == generated_labels)),
        "fidelity_per_class": fidelity,
        "frechet_distance": frechet_distance(reference.features(generated), reference.features(split.test.images)),
        "frechet_distance_real_vs_real": frechet_distance(reference.features(split.clients.images),
                                                          reference.features(split.test.images)),
        "nn_distance_generated_median": float(np.median(gen_nn)),
        "nn_distance_real_heldout_median": float(np.median(real_nn)),
        "exact_copies": int(np.sum(gen_nn == 0)),
        # share of samples nearer a training image than all but 5% of real unseen digits are
        "near_copy_fraction": float(np.mean(gen_nn < np.percentile(real_nn, 5))),
        "within_class_spread_generated": within_class_spread(generated, generated_labels),
        "within_class_spread_real": within_class_spread(split.test.images, split.test.labels),
    }


def inception_features(images: np.ndarray, weights_path: str, batch_size: int = 100) -> np.ndarray:
    """2048-d pool features from the standard FID Inception network, when the user has it.

    The file is the TorchScript detector of StyleGAN2-ADA's metrics (inception-2015-12-05.pt,
    which resizes to 299x299 itself): called on uint8 [N, 3, H, W] with return_features=True.
    Nothing is downloaded; grey images are repeated to three channels.
    """
    import torch

    detector = torch.jit.load(weights_path, map_location="cpu").eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return np.concatenate([detector(x[i:i + batch_size], return_features=True).numpy()
                               for i in range(0, len(x), batch_size)]).astype(np.float64)


def inception_fid(generated: np.ndarray, real: np.ndarray, weights_path: str) -> float:
    return frechet_distance(inception_features(generated, weights_path), inception_features(real, weights_path))
