"""The synthetic training population of `--dataset synthetic-digits` (generation.population,
issue 25 item 3): drawn by the shipped GAN, the same for a seed, cached and keyed by
checkpoint, seed and size, labels balanced, the test set the real digits; a fleet far beyond
the real digits' 98 devices gets data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedfill.config import RunConfig
from fedfill.data import load_dataset
from generation import population
from generation.config import DEFAULT_CHECKPOINT, GAN_CHECKPOINT
from generation.population import cache_path, checkpoint_digest, draw_population, synthetic_population


def test_the_same_seed_draws_the_same_population_and_another_seed_another():
    first, again, other = draw_population(120, 0), draw_population(120, 0), draw_population(120, 1)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert not np.array_equal(first.images, other.images)
    assert first.images.shape == (120, 8, 8, 1) and first.class_names == tuple(str(c) for c in range(10))
    # a population is a prefix of a larger one: batches are seeded by their first index
    assert np.array_equal(draw_population(1200, 0).images[:1000], draw_population(1000, 0).images)


def test_labels_are_balanced():
    counts = draw_population(1234, 3).class_counts()
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1234


def test_the_population_is_cached_and_reused(tmp_path, monkeypatch):
    drawn = synthetic_population(300, 0, directory=tmp_path)
    path = cache_path(300, 0, directory=tmp_path)
    assert path.is_file() and [p.name for p in tmp_path.glob("*.npz")] == [path.name]

    def no_draw(*args, **kwargs):
        raise AssertionError("the cached population was drawn again")

    monkeypatch.setattr(population, "draw_population", no_draw)
    cached = synthetic_population(300, 0, directory=tmp_path)
    assert np.array_equal(cached.images, drawn.images) and np.array_equal(cached.labels, drawn.labels)
    assert cached.class_names == drawn.class_names


def test_a_broken_cache_file_is_drawn_again(tmp_path):
    path = cache_path(100, 0, directory=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    assert np.array_equal(synthetic_population(100, 0, directory=tmp_path).images, draw_population(100, 0).images)


def test_the_cache_is_keyed_by_checkpoint_seed_and_size(tmp_path):
    base = cache_path(500, 0, directory=tmp_path)
    assert len({base, cache_path(500, 1, directory=tmp_path), cache_path(600, 0, directory=tmp_path),
                cache_path(500, 0, DEFAULT_CHECKPOINT, directory=tmp_path)}) == 4
    # a retrained checkpoint at the same path keys a new population; its README does not
    copy = tmp_path / "gan"
    shutil.copytree(GAN_CHECKPOINT, copy)
    assert checkpoint_digest(copy) == checkpoint_digest(GAN_CHECKPOINT)
    (copy / "README.md").write_text("notes\n")
    assert checkpoint_digest(copy) == checkpoint_digest(GAN_CHECKPOINT)
    weights = copy / "generator" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert checkpoint_digest(copy) != checkpoint_digest(GAN_CHECKPOINT)
    # the DDPM draws another population, under another name
    ddpm = synthetic_population(10, 0, DEFAULT_CHECKPOINT, directory=tmp_path)
    assert not np.array_equal(ddpm.images, synthetic_population(10, 0, directory=tmp_path).images)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_a_fleet_beyond_the_real_digits_gets_synthetic_training_data_and_the_real_test_set(tmp_path, monkeypatch):
    monkeypatch.setenv(population.CACHE_ENV, str(tmp_path))
    from commands.checks import check_split
    from jobs import load_job, run_split, training_data

    run = RunConfig(dataset="synthetic-digits", num_partitions=1000)
    split, real = run_split(run), run_split(RunConfig())
    assert np.array_equal(split.test.images, real.test.images) and np.array_equal(split.test.labels, real.test.labels)
    assert len(split.clients) == 50_000
    real_images = {image.tobytes() for image in load_dataset("digits").images}
    assert sum(image.tobytes() in real_images for image in split.clients.images[:2000]) == 0
    partitions = check_split(run)
    assert len(partitions) == 1000 and min(len(p) for p in partitions) >= 10
    node = load_job(run).node_data(999, 1000)
    assert len(node) == len(partitions[999])
    assert training_data(run).startswith("synthetic: 50000 images drawn by the shipped GAN")
    assert training_data(RunConfig()) == "real (digits)"


def test_the_server_side_of_a_fleet_holds_no_device_data(tmp_path, monkeypatch):
    """The ServerApp evaluates and shapes the model from the real test set and never draws the
    population; the driver's checks draw it (warming the disk cache) and then let it go."""
    monkeypatch.setenv(population.CACHE_ENV, str(tmp_path))
    import jobs
    from commands.checks import check_split

    run = RunConfig(dataset="synthetic-digits", num_partitions=321, seed=5)
    job = jobs.load_job(run)
    job.evaluate(job.initial_weights())
    assert jobs.held_out(run).test.images.shape[1:] == (8, 8, 1) and job.num_classes == 10
    assert not list(tmp_path.rglob("*.npz")), "the server side drew a population"
    check_split(run)
    assert len(list(tmp_path.rglob("*.npz"))) == 1 and jobs.run_split.cache_info().currsize >= 1
    jobs.forget_data()
    assert jobs.run_split.cache_info().currsize == 0 and jobs._partitions.cache_info().currsize == 0


@pytest.mark.parametrize("argv", [["generator", "train", "--dataset", "synthetic-digits"],
                                  ["fit-learning", "--dataset", "synthetic-digits"]])
def test_commands_that_need_a_real_dataset_refuse_synthetic_digits(argv, tmp_path, capsys):
    from fedfill.cli import main

    assert main([*argv, "--out" if argv[0] == "generator" else "--output", str(tmp_path / "x")]) == 2
    assert "synthetic-digits is a run's training population" in capsys.readouterr().err
