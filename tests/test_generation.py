"""The generator: checkpoints that refuse to load wrongly, deterministic guided sampling,
measured quality of the shipped digits checkpoint, training that resumes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfill.data import load_digits, split_dataset
from generation.model import DEFAULT_CHECKPOINT, CheckpointError, load_generator
from generation.quality import evaluate_generator
from generation.sample import sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator():
    return load_generator(DEFAULT_CHECKPOINT)


def test_shipped_checkpoint_records_the_command_that_made_it(generator):
    config, _ = generator
    assert config.provenance["command"].startswith("fedfill generator train --dataset digits")
    assert config.provenance["seed"] == 0 and config.num_classes == 10


def test_the_same_seed_gives_the_same_images(generator):
    config, unet = generator
    labels = np.array([0, 3, 3, 9])
    a = sample(config, unet, labels, steps=10, seed=7)
    b = sample(config, unet, labels, steps=10, seed=7)
    c = sample(config, unet, labels, steps=10, seed=8)
    assert a.dtype == np.uint8 and a.shape == (4, 8, 8, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_shipped_digits_generator_draws_its_classes_without_copying(generator):
    config, unet = generator
    labels = np.repeat(np.arange(10), 40)
    images = sample(config, unet, labels, steps=20, guidance=2.0, seed=1)
    report = evaluate_generator(images, labels, split_dataset(load_digits(), seed=0))
    assert report["reference_accuracy_on_real_test"] > 0.9, "the judge itself must be competent"
    assert report["fidelity"] >= 0.9
    assert min(report["fidelity_per_class"].values()) >= 0.7
    assert report["exact_copies"] == 0
    # Not memorised: most samples are as far from the training images as real unseen digits
    # (5% of those fall below the threshold; measured 16% of samples at guidance 2) ...
    assert report["near_copy_fraction"] <= 0.3
    assert report["nn_distance_generated_median"] >= 0.7 * report["nn_distance_real_heldout_median"]
    # ... and diverse: two samples of a class differ about as much as two real digits do
    assert report["within_class_spread_generated"] >= 0.7 * report["within_class_spread_real"]


def test_unknown_class_is_refused(generator):
    config, unet = generator
    with pytest.raises(ValueError, match="class labels"):
        sample(config, unet, np.array([10]), steps=2)


def test_corrupted_or_mismatched_checkpoints_are_refused_with_a_reason(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_CHECKPOINT, broken, ignore=shutil.ignore_patterns("train_state.pt", "cache"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_generator(broken)
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_CHECKPOINT, other, ignore=shutil.ignore_patterns("train_state.pt", "cache"))
    config = json.loads((other / "config.json").read_text())
    config["block_out_channels"] = [16, 32]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        load_generator(other)
    with pytest.raises(CheckpointError, match="no generator checkpoint"):
        load_generator(tmp_path / "nowhere")


def fedfill(*args):
    return subprocess.run([sys.executable, "-m", "fedfill", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sample_command_writes_npz_and_png_and_refuses_bad_input(tmp_path):
    done = fedfill("generator", "sample", "--class", "3", "--n", "6", "--out", str(tmp_path / "x.npz"))
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "x.npz") as data:
        assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
        assert data["labels"].tolist() == [3] * 6
    assert fedfill("generator", "sample", "--class", "5", "--n", "9", "--out", str(tmp_path / "g.png")).returncode == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    for bad, message in ((["--class", "12", "--n", "2", "--out", str(tmp_path / "y.npz")], "unknown class 12"),
                         (["--class", "1", "--n", "-3", "--out", str(tmp_path / "y.npz")], "--n must be"),
                         (["--class", "1", "--out", str(tmp_path / "y.txt")], ".npz or .png"),
                         (["--class", "1", "--out", str(tmp_path / "y.npz"), "--checkpoint", str(tmp_path)],
                          "no generator checkpoint")):
        done = fedfill("generator", "sample", *bad)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_training_resumes_from_its_last_state(tmp_path):
    from generation.train import train_generator

    data = split_dataset(load_digits(), seed=0).public
    out = tmp_path / "gen"
    train_generator(data.images, data.labels, data.class_names, out, steps=3, batch_size=8, save_every=3,
                    progress=False)
    train_generator(data.images, data.labels, data.class_names, out, steps=5, batch_size=8, save_every=5,
                    progress=False)
    assert json.loads((out / "train_log.json").read_text())["steps"] == 5
    config, _ = load_generator(out)
    assert config.provenance["steps"] == 5


def test_more_sampler_steps_do_not_cost_fidelity(generator):
    """Guards the DDIM x0-clipping trap: fidelity fell from 97% to 25% going from 20 to 100 steps."""
    from generation.quality import ReferenceClassifier

    config, unet = generator
    split = split_dataset(load_digits(), seed=0)
    judge = ReferenceClassifier(split.clients.images, split.clients.labels)
    labels = np.repeat(np.arange(10), 8)
    for steps in (20, 60):
        images = sample(config, unet, labels, steps=steps, guidance=2.0, seed=2)
        assert np.mean(judge.predict(images) == labels) >= 0.9, f"{steps} steps"


def test_inception_fid_runs_a_local_torchscript_detector(tmp_path):
    """The real detector cannot be fetched here; a TorchScript module with its interface
    (uint8 [N,3,H,W], return_features=True -> [N, D]) checks our side of the call."""
    import torch

    from generation.quality import inception_fid

    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            x = x.float() / 255.0
            return torch.cat([x.mean(dim=(1, 2, 3)).unsqueeze(1), x.std(dim=(1, 2, 3)).unsqueeze(1)], dim=1)

    path = tmp_path / "detector.pt"
    torch.jit.script(Detector()).save(str(path))
    digits = split_dataset(load_digits(), seed=0)
    same = inception_fid(digits.clients.images, digits.test.images, str(path))
    blank = inception_fid(np.zeros_like(digits.test.images), digits.test.images, str(path))
    assert 0 <= same < blank


def test_generator_trains_on_a_real_dataset_from_a_local_directory(tmp_path):
    """The command reads CIFAR-10 in its published format (tiny files written here) and
    writes a 32x32x3 checkpoint that loads and samples."""
    from tests.test_data_loaders import write_cifar10

    write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0), per_batch=20)
    out = tmp_path / "gen"
    done = fedfill("generator", "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out),
                   "--steps", "2", "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    config, unet = load_generator(out)
    assert (config.image_size, config.channels, config.num_classes) == (32, 3, 10)
    assert sample(config, unet, np.array([4]), steps=2).shape == (1, 32, 32, 3)
    bad = fedfill("generator", "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                  "--out", str(out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
