"""The GAN baseline (FIMI §V-B): its checkpoint round-trips and refuses to load broken, the real
gRPC service serves it with its cache, the shipped one draws its classes (measured), and the
training command writes a loadable checkpoint and resumes exactly."""

import json
import shutil

import numpy as np
import pytest
import torch

from fedfill.cli import main
from fedfill.data import load_digits, split_dataset
from generation.client import GenerationClient, GenerationUnavailable
from generation.checkpoint import save_gan_checkpoint
from generation.gan import GanGenerator, GanPipeline
from generation.train import train_gan
from generation.checkpoint import load_generator, weights_digest
from generation.config import DEFAULT_CHECKPOINT, GAN_CHECKPOINT, CheckpointError
from generation.quality import evaluate_generator
from generation.sample import sample
from generation.service import serve


@pytest.fixture(scope="module")
def gan():
    return load_generator(GAN_CHECKPOINT)


def test_shipped_gan_records_the_command_that_made_it(gan):
    config, pipe = gan
    assert config.model == "gan" and isinstance(pipe, GanPipeline) and config.num_classes == 10
    provenance = config.provenance
    assert provenance["command"] == ("fedfill generator train --model gan --dataset digits --out "
                                     "generation/checkpoints/digits-gan --steps 3000 --batch-size 64 --lr 0.0002 "
                                     "--seed 0 --split-seed 0")
    assert (provenance["model"], provenance["dataset"], provenance["split_seed"]) == ("gan", "digits", 0)
    assert provenance["trained_classes"] == list(range(10)) and provenance["train_images"] == 450
    assert not (GAN_CHECKPOINT / "train_state.pt").exists(), "the shipped directory holds no train state"


def test_save_and_load_give_the_same_images_and_diffusers_alone_loads_it(gan, tmp_path):
    """Round trip through save_gan_checkpoint; GanPipeline.from_pretrained (diffusers' loader,
    no checks of ours) draws what sample() draws, batch by batch under its seeding rule."""
    config, pipe = gan
    labels = np.array([0, 3, 3, 9, 5, 1])
    images = sample(config, pipe, labels, seed=7, batch_size=4)
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert not np.array_equal(images, sample(config, pipe, labels, seed=8, batch_size=4))
    save_gan_checkpoint(tmp_path / "copy", config, pipe.generator)
    copy_config, copy_pipe = load_generator(tmp_path / "copy")
    assert copy_config == config and weights_digest(copy_pipe) == weights_digest(pipe)
    assert np.array_equal(sample(copy_config, copy_pipe, labels, seed=7, batch_size=4), images)
    plain = GanPipeline.from_pretrained(GAN_CHECKPOINT, local_files_only=True)
    batches = [plain(labels[start:start + 4], output_type="uint8",
                     generator=torch.Generator().manual_seed(7 * 1_000_003 + start)).images for start in (0, 4)]
    assert np.array_equal(np.concatenate(batches), images)
    floats = plain(labels[:2], generator=torch.Generator().manual_seed(7 * 1_000_003)).images
    assert floats.dtype == np.float32 and np.array_equal(np.round(floats * 255).astype(np.uint8), images[:2])


def test_steps_guidance_and_sampler_are_ignored_and_unknown_classes_refused(gan):
    config, pipe = gan
    labels = np.array([2, 4])
    assert np.array_equal(sample(config, pipe, labels, steps=5, guidance=0.0, seed=1),
                          sample(config, pipe, labels, steps=50, guidance=7.0, sampler="dpm", seed=1))
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        sample(config, pipe, np.array([10]))
    with pytest.raises(ValueError, match="no class labels"):
        pipe([], output_type="uint8")


def test_the_ddpm_and_the_gan_have_different_digests(gan):
    _, ddpm = load_generator(DEFAULT_CHECKPOINT)
    assert weights_digest(ddpm) != weights_digest(gan[1])


def copy_gan(destination):
    shutil.copytree(GAN_CHECKPOINT, destination, ignore=shutil.ignore_patterns("train_state.pt", "cache"))
    return destination


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name, breaking, reason", [
    ("truncated weights", lambda d: (d / "generator" / "diffusion_pytorch_model.safetensors").write_bytes(
        (d / "generator" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]), "corrupted"),
    ("no weights", lambda d: (d / "generator" / "diffusion_pytorch_model.safetensors").unlink(),
     "diffusion_pytorch_model.safetensors is missing"),
    ("other widths", lambda d: edit_json(d / "generator" / "config.json", lambda c: c.update(widths=[64, 32])),
     "does not match its generator/config.json"),
    ("latent too large to describe", lambda d: edit_json(d / "generator" / "config.json",
                                                         lambda c: c.update(latent_dim=10**9)),
     "'latent_dim' is 1000000000, beyond what the weights"),
    ("image size the widths cannot reach", lambda d: edit_json(d / "generator" / "config.json",
                                                               lambda c: c.update(image_size=9)),
     "cannot be loaded: image_size 9 is not divisible"),
    ("class names short", lambda d: edit_json(d / "generator.json", lambda m: m.update(class_names=["0", "1"])),
     "generator.json does not match its generator/config.json: the generator has 10 classes, generator.json "
     "lists 2"),
    ("index entry", lambda d: edit_json(d / "model_index.json", lambda i: i.update(generator="GanGenerator")),
     "'generator' must be a \\[library, class\\] pair"),
    ("another module named", lambda d: edit_json(d / "model_index.json",
                                                  lambda i: i.update(generator=["os", "system"])),
     "names GanPipeline with generator \\['os', 'system'\\]; a GAN checkpoint of ours is GanPipeline"),
    ("another pipeline named", lambda d: edit_json(d / "model_index.json",
                                                   lambda i: i.update(_class_name="ClassConditionalPipeline")),
     "names ClassConditionalPipeline with generator"),
    ("config not an object", lambda d: (d / "generator" / "config.json").write_text("[1, 2]"),
     "not a valid GAN generator config: not a JSON object"),
])
def test_a_broken_gan_checkpoint_is_refused_with_a_reason(tmp_path, name, breaking, reason):
    broken = copy_gan(tmp_path / "broken")
    breaking(broken)
    with pytest.raises(CheckpointError, match=reason):
        load_generator(broken)


def test_a_gan_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """diffusers alone would warn and leave the tensor random."""
    from safetensors.torch import load_file, save_file

    short = copy_gan(tmp_path / "short")
    weights = short / "generator" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["project.bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="does not match its generator/config.json: 1 tensors differ, "
                                              "first project.bias"):
        load_generator(short)


@pytest.fixture(scope="module")
def gan_service(tmp_path_factory):
    server, port, servicer = serve(GAN_CHECKPOINT, 0, tmp_path_factory.mktemp("cache"))
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=1)


def test_the_service_serves_the_gan_and_caches_it(gan_service, gan):
    address, servicer = gan_service
    assert servicer.config.model == "gan" and servicer.checkpoint_digest == weights_digest(gan[1])
    client = GenerationClient(address, timeout_s=60, retries=0)
    counts = [0, 5, 0, 300, 0, 0, 0, 0, 0, 2]  # more than one stream batch
    images, labels = client.generate(counts, seed=3, steps=8)
    assert images.shape == (307, 8, 8, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert np.array_equal(images, sample(gan[0], gan[1], labels, seed=3))
    computed = servicer.computed
    again, _ = client.generate(counts, seed=3, steps=8)
    assert servicer.computed == computed and servicer.cache_hits >= 1 and np.array_equal(again, images)
    other, _ = client.generate(counts, seed=4, steps=8)
    assert servicer.computed == computed + 1 and not np.array_equal(other, images)
    # steps and guidance are checked as for a DDPM, then ignored: the same images
    assert np.array_equal(client.generate(counts, seed=3, steps=20, guidance=0.0)[0], images)
    with pytest.raises(GenerationUnavailable, match="INVALID_ARGUMENT.*steps must be in 1..1000"):
        client.generate(counts, seed=3, steps=0)


def test_shipped_gan_draws_its_classes_without_copying(gan):
    """Measured (40 per class, seed 1): fidelity 99.0%, lowest class 95%; near-copy fraction
    0.09; Fréchet distance 1.01 (real vs real 0.39); spread 0.87x the real digits'."""
    config, pipe = gan
    labels = np.repeat(np.arange(10), 40)
    report = evaluate_generator(sample(config, pipe, labels, seed=1), labels, split_dataset(load_digits(), seed=0))
    assert report["reference_accuracy_on_real_test"] > 0.9, "the judge itself must be competent"
    assert report["fidelity"] >= 0.9
    assert min(report["fidelity_per_class"].values()) >= 0.75
    assert report["frechet_distance"] <= 2.0
    assert report["exact_copies"] == 0 and report["near_copy_fraction"] <= 0.3
    assert report["within_class_spread_generated"] >= 0.7 * report["within_class_spread_real"]


def test_train_command_writes_a_loadable_gan_that_resumes_exactly(tmp_path, capsys):
    """3 steps, then 3 more from train_state.pt, give the weights of 6 steps in one run."""
    from safetensors.torch import load_file

    def train(out, steps, *extra):
        return main(["generator", "train", "--model", "gan", "--out", str(tmp_path / out), "--steps", str(steps),
                     "--batch-size", "8", *extra])

    assert train("resumed", 3) == 0
    config, pipe = load_generator(tmp_path / "resumed")
    assert config.model == "gan" and config.provenance["lr"] == 2e-4 and config.provenance["steps"] == 3
    assert sample(config, pipe, np.array([4]), seed=0).shape == (1, 8, 8, 1)
    assert train("resumed", 6) == 0 and train("straight", 6) == 0
    weights = [load_file(tmp_path / out / "generator" / "diffusion_pytorch_model.safetensors")
               for out in ("resumed", "straight")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((tmp_path / "resumed" / "train_log.json").read_text())["steps"] == 6
    assert load_generator(tmp_path / "resumed")[0].provenance["command"].startswith(
        "fedfill generator train --model gan --dataset digits ")
    capsys.readouterr()
    assert train("resumed", 9, "--classes", "0-4") == 2
    assert "written for training on classes 0,1,2,3,4,5,6,7,8,9, this run trains on 0,1,2,3,4" in capsys.readouterr().err
    # A DDPM's train state is not a GAN's, nor the other way round.
    assert main(["generator", "train", "--out", str(tmp_path / "resumed"), "--steps", "9", "--batch-size", "8"]) == 2
    assert "written for another model or dataset" in capsys.readouterr().err


def test_a_gan_trains_on_32x32_colour_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    train_gan(images, np.arange(12) % 3, ("a", "b", "c"), tmp_path / "colour", steps=2, batch_size=4, progress=False)
    config, pipe = load_generator(tmp_path / "colour")
    assert (config.image_size, config.channels, config.num_classes) == (32, 3, 3)
    assert tuple(pipe.generator.config.widths) == (256, 256, 128, 64)
    assert sample(config, pipe, np.array([2]), seed=0).shape == (1, 32, 32, 3)


def test_a_generator_the_widths_cannot_build_is_refused_at_once():
    with pytest.raises(ValueError, match="image_size 12 is not divisible by 2\\^3"):
        GanGenerator(image_size=12, widths=(32, 32, 32, 32))
    with pytest.raises(ValueError, match="positive integers"):
        GanGenerator(latent_dim=0)
