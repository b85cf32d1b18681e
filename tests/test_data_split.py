import numpy as np
import pytest

from fedfill.data import load_digits, split_dataset, stratified_split


def test_split_is_disjoint_complete_stratified_and_repeatable():
    digits = load_digits()
    split = split_dataset(digits, seed=3)
    parts = [split.public, split.clients, split.test]
    assert sum(len(p) for p in parts) == len(digits)
    # rows are whole images: every image of the split is one of the originals, none used twice
    keys = {p.images[i].tobytes() + bytes([p.labels[i]]) for p in parts for i in range(len(p))}
    assert len(keys) == len({digits.images[i].tobytes() + bytes([digits.labels[i]]) for i in range(len(digits))})
    for part, fraction in ((split.public, 0.25), (split.test, 0.2)):
        assert np.allclose(part.class_counts() / digits.class_counts(), fraction, atol=0.02)
    again = split_dataset(digits, seed=3)
    assert np.array_equal(again.public.images, split.public.images)


def test_stratified_split_keeps_each_class_share():
    digits = load_digits()
    held, rest = stratified_split(digits, [0.3], seed=1)
    assert len(held) + len(rest) == len(digits)
    assert np.all(np.abs(held.class_counts() - 0.3 * digits.class_counts()) <= 0.5)
    with pytest.raises(ValueError):
        stratified_split(digits, [0.7, 0.4])
