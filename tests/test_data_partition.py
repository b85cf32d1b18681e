import numpy as np
import pytest

from fedfill.data import load_digits, split_dataset
from fedfill.partition import dirichlet_partition, label_skew, partition_class_counts


@pytest.fixture(scope="module")
def pool_labels():
    return split_dataset(load_digits()).clients.labels


@pytest.mark.parametrize("alpha", [0.05, 0.4, 0.6, 100.0])
def test_every_index_exactly_once_and_min_size(pool_labels, alpha):
    parts = dirichlet_partition(pool_labels, 20, alpha, seed=1, min_size=15)
    everything = np.concatenate(parts)
    assert len(everything) == len(pool_labels)
    assert np.array_equal(np.sort(everything), np.arange(len(pool_labels)))
    assert min(len(p) for p in parts) >= 15


def test_same_seed_same_partition_other_seed_differs(pool_labels):
    a = dirichlet_partition(pool_labels, 10, 0.4, seed=3)
    b = dirichlet_partition(pool_labels, 10, 0.4, seed=3)
    c = dirichlet_partition(pool_labels, 10, 0.4, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_skew_grows_as_alpha_shrinks(pool_labels):
    def mean_skew(alpha):
        return np.mean([label_skew(partition_class_counts(pool_labels, dirichlet_partition(
            pool_labels, 10, alpha, seed=s), 10)) for s in range(5)])

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.4, 0.1)]
    assert all(a < b for a, b in zip(skews, skews[1:])), skews
    assert skews[0] < 0.15 and skews[-1] > 0.5  # near-IID vs a few classes per device


def test_repair_guarantees_min_size_when_draws_keep_failing():
    labels = np.repeat(np.arange(10), 30)
    parts = dirichlet_partition(labels, 30, 0.01, seed=0, min_size=9, max_draws=1, self_balancing=False)
    assert min(len(p) for p in parts) >= 9
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(300))


def test_class_counts_add_up(pool_labels):
    parts = dirichlet_partition(pool_labels, 7, 0.6, seed=2)
    counts = partition_class_counts(pool_labels, parts, 10)
    assert counts.shape == (7, 10)
    assert np.array_equal(counts.sum(axis=0), np.bincount(pool_labels, minlength=10))
    assert counts.sum(axis=1).tolist() == [len(p) for p in parts]


def test_impossible_requests_are_rejected(pool_labels):
    with pytest.raises(ValueError, match="at least"):
        dirichlet_partition(pool_labels, 100, 0.5, min_size=len(pool_labels))
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(pool_labels, 3, 0.0)
    with pytest.raises(ValueError, match="num_partitions"):
        dirichlet_partition(pool_labels, 0, 0.5)
