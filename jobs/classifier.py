"""The classifier job: VGG-9 on labelled images, as in [FIMI].

Every node takes its Dirichlet share of the clients' pool (the same split in every process,
from the run's seed); the server evaluates on the held-out test set.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from jobs import Job, LocalResult, held_out


class ClassifierJob(Job):
    metrics = ("accuracy", "loss")
    finite_metrics = ("loss",)  # overflows to NaN when a merged update diverged, weights still finite

    @property
    def _split(self):
        """The test set and classes; the devices' pool stays with the devices (jobs.held_out)."""
        return held_out(self.run)

    def _model(self):
        from fedfill.models import model_for_images

        test = self._split.test
        return model_for_images(test.images.shape, test.num_classes)

    def initial_weights(self) -> list[np.ndarray]:
        import torch

        from fedfill.models import get_weights

        torch.manual_seed(self.run.seed)
        return get_weights(self._model())

    def train(self, weights, images, labels, *, seed: int, threads: int = 1,
              unlabelled: np.ndarray | None = None) -> LocalResult:
        """`unlabelled`: images whose labels the device does not use (SEMI's pseudo-labels)."""
        import torch

        from fedfill.models import get_weights, model_for_images, set_weights, train

        model = model_for_images(images.shape, self.num_classes)
        set_weights(model, weights)
        torch.manual_seed(seed)  # dropout draws from the global generator: same seed, same run
        # One thread: a device trains alone, and on a shared host several ClientApps at two
        # threads each oversubscribe the cores and turn the measured time into contention.
        torch.set_num_threads(threads)
        started = time.perf_counter()
        loss = train(model, images, labels, epochs=self.run.local_epochs, lr=self.run.lr,
                     batch_size=self.run.batch_size, seed=seed, unlabelled=unlabelled,
                     threshold=self.run.pseudo_label_threshold)
        return LocalResult(get_weights(model), float(loss), time.perf_counter() - started)

    @property
    def num_classes(self) -> int:
        return self._split.test.num_classes

    @functools.cached_property
    def _evaluation(self):
        """A model to load global weights into and the test set as tensors, made once."""
        import torch

        from fedfill.models import images_to_tensor

        test = self._split.test
        return self._model(), images_to_tensor(test.images), torch.as_tensor(test.labels)

    def evaluate(self, weights) -> dict[str, float]:
        import torch

        from fedfill.models import set_weights

        model, x, y = self._evaluation
        set_weights(model, weights)
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(1) == y).float().mean())
        return {"accuracy": accuracy, "loss": loss}
