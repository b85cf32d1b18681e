"""A synthetic training population for scale runs (`--dataset synthetic-digits`).

The embedded digits hold 988 images for the clients, enough for about 98 devices; a fleet of
thousands needs more. The shipped GAN (generation/checkpoints/digits-gan) draws them: it samples
1,000 digits in about 0.05-0.09 s on 2 cores where the DDPM takes about 9 s, so a 1,000-device
population (50,000 images) costs seconds, not minutes, at start. The test set stays the real
digits (jobs.run_split).

Where it is drawn: by whichever process of a run needs it first on a machine (on `fedfill run`'s
machine the pre-run check), and cached on that machine's disk. It is a pure function of the
checkpoint's bytes, the seed and the size: labels cycle through the classes (balanced), and
images come in batches of DRAW_BATCH, each seeded by the seed and its first index
(generation.sample's rule). A process on another machine (a Ray worker of a cluster, item 1 of
issue 25) that finds no cache draws the same population itself rather than reading a file it
cannot see; no shared file system is needed. Processes of one machine take a file lock, so one
draws and the others read its file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedfill.data import ImageDataset

from .config import GAN_CHECKPOINT

PER_DEVICE = 50  # images a device holds on average (the Dirichlet split skews the sizes)
DRAW_BATCH = 1000  # one generator call each: a call costs as much as 1,000 images at 50 a call
POPULATION_STREAM = 0x5E7D16  # keeps the population's noise apart from the generation service's seeds
CACHE_ENV = "FEDFILL_CACHE"  # where caches live; default $XDG_CACHE_HOME/fedfill or ~/.cache/fedfill
# files of a checkpoint that do not change what it draws
_NOT_WEIGHTS = {"README.md", "train_log.json", "train_state.pt"}


def population_size(nodes: int) -> int:
    return PER_DEVICE * nodes


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfill"


def checkpoint_digest(checkpoint: str | Path) -> str:
    """sha256 over the checkpoint's files that decide its draws: a retrained checkpoint at the
    same path keys a new population."""
    root = Path(checkpoint)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in _NOT_WEIGHTS):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_path(size: int, seed: int, checkpoint: str | Path = GAN_CHECKPOINT, directory: Path | None = None) -> Path:
    directory = Path(directory) if directory is not None else cache_root() / "populations"
    return directory / f"{checkpoint_digest(checkpoint)[:16]}-seed{seed}-n{size}.npz"


def population_labels(size: int, num_classes: int) -> np.ndarray:
    """Classes in turn: every class count within one of the others."""
    return np.arange(size, dtype=np.int64) % num_classes


def synthetic_population(size: int, seed: int, checkpoint: str | Path = GAN_CHECKPOINT,
                         directory: Path | None = None) -> ImageDataset:
    """`size` labelled images drawn by the generator at `checkpoint`, from this machine's cache
    when it holds them, else drawn and cached (see the module's note)."""
    if size < 1:
        raise ValueError(f"a population needs at least one image, not {size}")
    path = cache_path(size, seed, checkpoint, directory)
    cached = _read(path, size)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        cached = _read(path, size)  # another process drew it while this one waited
        if cached is not None:
            return cached
        population = draw_population(size, seed, checkpoint)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, images=population.images, labels=population.labels,
                 class_names=np.asarray(population.class_names))
        os.replace(partial, path)
    return population


def draw_population(size: int, seed: int, checkpoint: str | Path = GAN_CHECKPOINT) -> ImageDataset:
    """The population itself, no cache: the same bytes for the same checkpoint, seed and size."""
    from .checkpoint import load_generator
    from .sample import sample

    config, pipe = load_generator(checkpoint)
    labels = population_labels(size, config.num_classes)
    stream_seed = int(np.random.SeedSequence([seed, POPULATION_STREAM]).generate_state(1)[0])
    images = sample(config, pipe, labels, seed=stream_seed, batch_size=DRAW_BATCH)
    names = tuple(config.class_names) or tuple(str(c) for c in range(config.num_classes))
    return ImageDataset(images, labels, names)


def _read(path: Path, size: int) -> ImageDataset | None:
    """The cached population, or None where there is none or it is not whole (a half-written
    or foreign file is drawn again)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            population = ImageDataset(npz["images"], npz["labels"], tuple(str(c) for c in npz["class_names"]))
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return population if len(population) == size else None


@contextmanager
def _locked(lock_path: Path, timeout_s: float = 600.0):
    """An exclusive lock on `lock_path` among this machine's processes; gives up (and draws
    anyway: the result is the same) after timeout_s, so a stuck holder never hangs a run."""
    with open(lock_path, "a") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
