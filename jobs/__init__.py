"""What a federated job is: the few things that differ between the jobs fedfill runs.

The ServerApp, the ClientApp and the strategy are the same for every job; a job supplies its
model, a node's data, the local training step and the central evaluation (the shape of
Flower's example apps' task module). The classifier job (VGG-9 on images, [FIMI]) is the
first; the diffusion fine-tuning job (a DDPM fine-tuned with on-demand quantization,
[ODQ]) is the second.

Jobs are named in the run config (`job = "classifier"`) and found through JOBS, a name ->
"module:Class" map, so that the shared layer names a job without importing its code.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfill.config import RunConfig
from fedfill.data import (SYNTHETIC_DIGITS, DatasetSplit, ImageDataset, load_dataset, load_node_data, real_dataset,
                          split_dataset)

JOBS = {"classifier": "jobs.classifier:ClassifierJob", "ddpm": "jobs.ddpm:DiffusionJob"}


@dataclass
class LocalResult:
    """What a device's local training step gives back."""

    weights: list[np.ndarray]
    loss: float
    seconds: float  # the training itself, measured (not imports or model building)


class Job(ABC):
    """A federated job over labelled images, built from the run's settings."""

    #: the central evaluation's columns in rounds.csv; the first is the headline metric
    #: (higher is better) that "best" and the compare table's targets refer to
    metrics: tuple[str, ...] = ()
    #: those of `metrics` that are finite whenever the model is sound: a run stops when one is
    #: not (server.app.check_finite); others may be NaN by design (nothing to score)
    finite_metrics: tuple[str, ...] = ()
    #: the paper setting ([FIMI] or [ODQ]) of its cost model and drawn devices (strategies.allocation.presets)
    preset: str = "fimi"

    def __init__(self, run: RunConfig):
        self.run = run

    @classmethod
    def check(cls, run: RunConfig) -> None:
        """Everything about a run of this job that can be wrong before it starts (its own
        settings and files), as ValueError with the reason; the pre-run checks call it before
        any process starts. Nothing by default."""
        return None

    @abstractmethod
    def initial_weights(self) -> list[np.ndarray]:
        """The global model before round 1 (the same for the same seed)."""

    def compute_params(self) -> int:
        """Parameters a sample's forward and backward pass runs through: the cost model's
        cycles per sample scale with it. By default the exchanged model; a job that trains
        and uploads a part of a larger network (LoRA adapters) counts the whole network."""
        return int(sum(w.size for w in self.initial_weights()))

    def node_data(self, partition_id: int, num_partitions: int) -> ImageDataset:
        """The local data of one node of the fleet: its Dirichlet share of the clients' pool."""
        pool, parts = _partitions(self.run, num_partitions)
        return pool.subset(parts[partition_id])

    def own_data(self, data_dir: str) -> ImageDataset:
        """A real node's own files (its `data-dir`), labelled by the run's classes and fitted
        to the run's image shape so that the job's model takes them. Raises NodeDataError
        (fedfill.data) when they cannot be used."""
        pool = run_split(self.run).clients
        return _own_data(str(Path(data_dir).expanduser().resolve()), pool.class_names, pool.images.shape[1:])

    @abstractmethod
    def train(self, weights: list[np.ndarray], images: np.ndarray, labels: np.ndarray, *, seed: int,
              threads: int = 1) -> LocalResult:
        """Local training from the global weights on local + synthetic samples."""

    @abstractmethod
    def evaluate(self, weights: list[np.ndarray]) -> dict[str, float]:
        """Central evaluation of global weights: one value per name in `metrics`."""

    def save(self, weights: list[np.ndarray], out_dir) -> str | None:
        """Write the final model in the job's own format (the run's checkpoint.npz aside), if
        it has one; returns what was written."""
        return None


def job_class(name: str) -> type[Job]:
    """The Job subclass JOBS names, imported only now."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; choose one of {', '.join(JOBS)}")
    module_name, class_name = JOBS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_job(run: RunConfig) -> Job:
    return job_class(run.job)(run)


@functools.lru_cache(maxsize=4)
def _partitions(run: RunConfig, num_partitions: int):
    """The clients' pool and its Dirichlet split, once per process (Ray reuses its actors)."""
    from fedfill.partition import dirichlet_partition

    pool = run_split(run).clients
    return pool, dirichlet_partition(pool.labels, num_partitions, run.dirichlet_alpha, run.seed)


@functools.lru_cache(maxsize=2)
def _own_data(data_dir: str, class_names: tuple[str, ...], image_shape: tuple[int, int, int]) -> ImageDataset:
    """A node's files, read once per process (a warm process serves many messages; a failed
    read is not cached, so a mended data-dir is read again)."""
    return load_node_data(data_dir, class_names, image_shape)


@functools.lru_cache(maxsize=2)
def run_split(run: RunConfig) -> DatasetSplit:
    """The public / clients / test split every process of the run derives the same way
    (once per process: Ray's actors and a warm process serve many messages).
    synthetic-digits: the real digits' public part and test set, and for the clients a
    population the shipped GAN draws, 50 images a device (generation.population)."""
    if run.dataset.lower() == SYNTHETIC_DIGITS:
        from generation.population import population_size, synthetic_population

        real = _real_split(real_dataset(run.dataset), run.seed)
        pool = synthetic_population(population_size(run.num_partitions), run.seed)
        return DatasetSplit(public=real.public, clients=pool, test=real.test)
    return split_dataset(load_dataset(run.dataset, run.data_dir or None), seed=run.seed)


def held_out(run: RunConfig) -> DatasetSplit:
    """The split as the server uses it: the public part and the test set, whose images set the
    model's shape and classes. For synthetic-digits it is the real dataset's split, whose
    `clients` are the real pool and not the run's drawn population: the server holds no
    device's data, so its memory does not grow with the fleet (issue 25)."""
    if run.dataset.lower() == SYNTHETIC_DIGITS:
        return _real_split(real_dataset(run.dataset), run.seed)
    return run_split(run)


@functools.lru_cache(maxsize=2)
def _real_split(dataset: str, seed: int) -> DatasetSplit:
    return split_dataset(load_dataset(dataset), seed=seed)


def forget_data() -> None:
    """Drop the split and partitions this process cached: a process that only checks a run
    (the driver's pre-run checks) keeps no device's data once it is done."""
    run_split.cache_clear()
    _partitions.cache_clear()


def training_data(run: RunConfig) -> str:
    """What the devices train on, as the report says it."""
    if run.dataset.lower() != SYNTHETIC_DIGITS:
        return f"real ({run.dataset})"
    from generation.config import GAN_CHECKPOINT
    from generation.population import population_size

    return (f"synthetic: {population_size(run.num_partitions)} images drawn by the shipped GAN "
            f"({GAN_CHECKPOINT.name}), {population_size(1)} a device on average, seed {run.seed}; "
            "the test set is the real digits")
