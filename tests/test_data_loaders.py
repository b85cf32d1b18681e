"""Each loader reads a few images written in the dataset's exact published format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from fedfill.data import CIFAR10_CLASSES, load_dataset, split_dataset


def random_images(rng, n, size, channels=3):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# ---------------------------------------------------------------- CIFAR-10

def write_cifar10(folder, rng, per_batch=2):
    """data_batch_1..5 + test_batch: dicts with 'data' [N, 3072] channel-major, 'labels', as published."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = random_images(rng, per_batch, 32)
        labels = rng.integers(0, 10, per_batch).tolist()
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (images, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar10_reads_published_batches(tmp_path):
    rng = np.random.default_rng(0)
    written = write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    ds = load_dataset("cifar10", tmp_path)
    order = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert np.array_equal(ds.images, np.concatenate([written[n][0] for n in order]))
    assert ds.labels.tolist() == sum((written[n][1] for n in order), [])
    assert ds.class_names == CIFAR10_CLASSES
    test = load_dataset("CIFAR-10", tmp_path / "cifar-10-batches-py", part="test")
    assert np.array_equal(test.images, written["test_batch"][0])


def test_cifar10_errors_name_the_path(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(1))
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(2))

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", tmp_path, part="test")


# ---------------------------------------------------------------- GTSRB

def write_gtsrb(root, rng, classes=(0, 2), per_class=2):
    """Final_Training/Images/<class>/GT-<class>.csv + .ppm files, a sign inside a margin (ROI)."""
    signs = {}
    for c in classes:
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            w, h = 40 + 3 * i, 36 + 2 * i
            img = np.zeros((h, w, 3), np.uint8)  # black margin around a uniformly coloured sign
            colour = rng.integers(50, 256, 3, dtype=np.uint8)
            img[5:h - 5, 5:w - 5] = colour
            name = f"00000_{i:05d}.ppm"
            Image.fromarray(img).save(folder / name, format="PPM")
            rows.append(f"{name};{w};{h};5;5;{w - 6};{h - 6};{c}")
            signs[(c, i)] = colour
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    return signs


def test_gtsrb_crops_roi_and_resizes(tmp_path):
    signs = write_gtsrb(tmp_path, np.random.default_rng(3))
    ds = load_dataset("gtsrb", tmp_path)
    assert ds.images.shape == (4, 32, 32, 3) and ds.num_classes == 43
    assert ds.labels.tolist() == [0, 0, 2, 2]
    # the ROI excludes the black margin: every pixel is the sign's colour
    for image, key in zip(ds.images, [(0, 0), (0, 1), (2, 0), (2, 1)]):
        assert np.all(image == signs[key])


def test_gtsrb_test_part_with_its_ground_truth(tmp_path):
    write_gtsrb(tmp_path, np.random.default_rng(8), classes=(5,), per_class=1)
    folder = tmp_path / "GTSRB" / "Final_Test" / "Images"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((30, 31, 3), 200, np.uint8)).save(folder / "00000.ppm", format="PPM")
    (folder / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;31;30;5;5;25;24;16\n")
    test = load_dataset("gtsrb", tmp_path, part="test")
    assert test.labels.tolist() == [16] and np.all(test.images == 200)
    assert load_dataset("gtsrb", tmp_path).labels.tolist() == [5, 16]


def test_gtsrb_bad_csv_and_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="Final_Training"):
        load_dataset("gtsrb", tmp_path)
    write_gtsrb(tmp_path, np.random.default_rng(4), classes=(1,))
    csv = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    csv.write_text("Filename,Width,Height,ClassId\nx.ppm,1,1,1\n")
    with pytest.raises(ValueError, match="GT-00001.csv.*columns"):
        load_dataset("gtsrb", tmp_path)
    with pytest.raises(FileNotFoundError, match="Final_Test"):
        load_dataset("gtsrb", tmp_path, part="test")


# ---------------------------------------------------------------- Fashion-MNIST

def idx_bytes(array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compressed):
    rng = np.random.default_rng(5)
    arrays = {"train": (random_images(rng, 3, 28, 1)[..., 0], rng.integers(0, 10, 3)),
              "t10k": (random_images(rng, 2, 28, 1)[..., 0], rng.integers(0, 10, 2))}
    for prefix, (images, labels) in arrays.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = tmp_path / f"{prefix}-{kind}-ubyte"
            if compressed:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(idx_bytes(array)))
            else:
                path.write_bytes(idx_bytes(array))
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.images.shape == (5, 28, 28, 1)
    assert np.array_equal(ds.images[:3, ..., 0], arrays["train"][0])
    assert ds.labels.tolist() == arrays["train"][1].tolist() + arrays["t10k"][1].tolist()
    assert ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_rejects_bad_magic_and_short_files(tmp_path):
    images, labels = np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-10])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*header says"):
        load_dataset("fashion-mnist", tmp_path, part="train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + idx_bytes(images)[4:])
    with pytest.raises(ValueError, match="magic"):
        load_dataset("fashion-mnist", tmp_path, part="train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path, part="test")


# ---------------------------------------------------------------- CINIC-10

def test_cinic10_reads_png_folders(tmp_path):
    rng = np.random.default_rng(6)
    expected = []
    for part in ("train", "valid", "test"):
        for label, cls in [(0, "airplane"), (7, "horse")]:
            folder = tmp_path / part / cls
            folder.mkdir(parents=True)
            img = random_images(rng, 1, 32)[0]
            Image.fromarray(img).save(folder / "n0001.png")
            expected.append((part, label, img))
        Image.fromarray(random_images(rng, 1, 32, 1)[0, ..., 0]).save(tmp_path / part / "horse" / "grey.png")
    ds = load_dataset("cinic10", tmp_path)
    assert ds.images.shape == (9, 32, 32, 3)
    assert ds.class_names == CIFAR10_CLASSES
    valid = load_dataset("cinic-10", tmp_path, part="valid")
    assert valid.labels.tolist() == [0, 7, 7]
    assert np.array_equal(valid.images[0], expected[2][2])
    grey = valid.images[1] if np.all(valid.images[1][..., 0] == valid.images[1][..., 1]) else valid.images[2]
    assert np.all(grey[..., 0] == grey[..., 2])  # a grey PNG comes back as three equal channels


def test_cinic10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("cinic10", tmp_path)
    (tmp_path / "train" / "unicorn").mkdir(parents=True)
    with pytest.raises(ValueError, match="unicorn"):
        load_dataset("cinic10", tmp_path, part="train")
    (tmp_path / "train" / "unicorn" / "x.png").parent.rmdir()
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("cinic10", tmp_path, part="train")


# ---------------------------------------------------------------- common

def test_unknown_name_part_or_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="valid"):
        load_dataset("cifar10", tmp_path, part="valid")


def test_digits_by_name_and_real_data_splits(tmp_path):
    digits = load_dataset("digits")
    assert len(digits) == 1797 and digits.images.shape[1:] == (8, 8, 1)
    rng = np.random.default_rng(7)
    write_cifar10(tmp_path, rng, per_batch=10)
    split = split_dataset(load_dataset("cifar10", tmp_path), public_fraction=0.3, test_fraction=0.3)
    assert len(split.public) + len(split.clients) + len(split.test) == 60
