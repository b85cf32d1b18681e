"""Split generation [MEG]: the service's delivery modes over real gRPC sockets, completed on the
"device" with the shipped checkpoint: exact hand-offs, the noise-aware resume, bytes, and bad
input refused with a reason."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedfill.codec import payload_bytes
from generation import generation_pb2, generation_pb2_grpc
from generation.checkpoint import load_generator
from generation.client import GenerationClient, GenerationUnavailable, MalformedReply, decode_reply
from generation.config import DEFAULT_CHECKPOINT, GAN_CHECKPOINT
from generation.delivery import DigestMismatch, finish
from generation.sample import complete, resume_point, sample, sample_until
from generation.service import serve

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [3, 0, 0, 0, 2, 0, 0, 0, 0, 3]  # 8 images of three classes
STEPS, SEED = 6, 11


@pytest.fixture(scope="module")
def generator():
    return load_generator(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server, port, servicer = serve(DEFAULT_CHECKPOINT, 0, tmp_path_factory.mktemp("cache"))
    yield GenerationClient(f"127.0.0.1:{port}", timeout_s=120, retries=0), servicer
    server.stop(grace=1)


def fetch_and_finish(client, generator, delivery, **options):
    config, pipe = generator
    delivered = client.fetch(COUNTS, SEED, STEPS, 2.0, delivery=delivery, **options)
    return delivered, finish(delivered, config, pipe, steps=STEPS, guidance=2.0, seed=SEED)


def test_a_32_bit_state_and_a_seed_make_image_modes_images_bit_for_bit(service, generator):
    client, _ = service
    reference, labels = client.generate(COUNTS, seed=SEED, steps=STEPS)
    for delivery, options in (("state", {"server_steps": 3, "state_bits": 32}), ("seed", {})):
        delivered, finished = fetch_and_finish(client, generator, delivery, **options)
        assert np.array_equal(finished.labels, labels)
        assert np.array_equal(finished.images, reference), delivery


def test_the_work_is_split_as_asked_and_counted_on_both_sides(service, generator):
    client, _ = service
    n = sum(COUNTS)
    image, done = fetch_and_finish(client, generator, "image")
    state, completed = fetch_and_finish(client, generator, "state", server_steps=2, state_bits=8)
    seed, generated = fetch_and_finish(client, generator, "seed")
    # a first request is sampled (its UNet passes counted); the same one again comes from the cache
    assert state.server_unet_evals == 2 * 2 * n and completed.device_unet_evals == 2 * (STEPS - 2) * n
    assert seed.server_unet_evals == 0 and generated.device_unet_evals == 2 * STEPS * n
    assert done.device_unet_evals == 0
    assert seed.downlink_bytes < 0.5 * image.downlink_bytes


def test_a_state_payload_is_the_codecs_exact_size_and_noise(service, generator):
    client, _ = service
    config, pipe = generator
    labels = np.repeat(np.arange(10), COUNTS)
    states = sample_until(config, pipe, labels, steps=STEPS, seed=SEED, stop_index=4)
    request = generation_pb2.GenerateRequest(class_counts=COUNTS, seed=SEED, steps=STEPS, guidance=2.0,
                                             delivery=generation_pb2.STATE, server_steps=4, state_bits=4)
    with grpc.insecure_channel(client.address) as channel:
        (batch,) = list(generation_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))
    from fedfill.codec import expected_squared_error

    assert len(batch.state) == payload_bytes([states.size], 4)
    assert batch.noise_var == pytest.approx(expected_squared_error([states], 4) / states.size, rel=1e-12)
    assert batch.resume_index == 4 and batch.timestep > 0


def test_the_noise_aware_resume_lands_where_the_noise_belongs(generator):
    config, pipe = generator
    from generation.pipeline import make_scheduler

    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod.double().numpy()
    for t, noise_var in ((500, 0.0), (500, 0.3), (100, 0.05), (900, 2.0)):
        resumed, scale = resume_point(scheduler, t, noise_var)
        assert resumed >= t and scale == pytest.approx(1 / np.sqrt(1 + noise_var))
        target = alphas[t] / (1 + noise_var)
        assert abs(alphas[resumed] - target) == pytest.approx(np.min(np.abs(alphas - target)))
    assert resume_point(scheduler, 500, 0.0)[0] == 500


def test_coarse_states_resumed_noise_aware_stay_closer_than_naive(generator):
    """At 2 bits the codec's noise is large; resuming where it belongs (F-2) keeps the images
    nearer image mode's than resuming as if the state were exact."""
    config, pipe = generator
    from fedfill.codec import decode, encode, expected_squared_error

    labels = np.repeat(np.arange(10), 4)
    reference = sample(config, pipe, labels, steps=10, seed=3).astype(int)
    states = sample_until(config, pipe, labels, steps=10, seed=3, stop_index=5)
    received = decode(encode([states], 2, np.random.default_rng(0)))[0]
    noise_var = expected_squared_error([states], 2) / states.size
    aware = complete(config, pipe, received, labels, steps=10, resume_index=5, noise_var=noise_var)
    naive = complete(config, pipe, received, labels, steps=10, resume_index=5, noise_var=noise_var, naive=True)
    assert np.abs(aware - reference).mean() < np.abs(naive - reference).mean()


@pytest.mark.parametrize("fields, reason", [
    ({"delivery": generation_pb2.STATE, "server_steps": 0, "state_bits": 8}, "server_steps must be in 1..5"),
    ({"delivery": generation_pb2.STATE, "server_steps": 6, "state_bits": 8}, "server_steps must be in 1..5"),
    ({"delivery": generation_pb2.STATE, "server_steps": 3, "state_bits": 1}, "state_bits must be in 2..32"),
    ({"delivery": generation_pb2.STATE, "server_steps": 3, "state_bits": 33}, "state_bits must be in 2..32"),
    ({"delivery": generation_pb2.SKETCH, "server_steps": 3, "sketch_factor": 3}, "sketch_factor must divide"),
    ({"delivery": generation_pb2.SKETCH, "server_steps": 3, "sketch_factor": 1}, "sketch_factor must divide"),
    ({"delivery": 7}, "unknown delivery 7"),
])
def test_a_hand_off_the_service_cannot_make_is_refused_with_the_reason(service, fields, reason):
    client, servicer = service
    computed = servicer.computed
    request = generation_pb2.GenerateRequest(class_counts=COUNTS, seed=SEED, steps=STEPS, guidance=2.0, **fields)
    with grpc.insecure_channel(client.address) as channel, pytest.raises(grpc.RpcError) as err:
        list(generation_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
    assert servicer.computed == computed


def test_a_gan_has_no_steps_to_split_but_serves_a_seed(tmp_path):
    server, port, _ = serve(GAN_CHECKPOINT, 0, tmp_path)
    try:
        client = GenerationClient(f"127.0.0.1:{port}", timeout_s=60, retries=0)
        with pytest.raises(GenerationUnavailable, match="INVALID_ARGUMENT.*GAN"):
            client.fetch(COUNTS, SEED, STEPS, delivery="state", server_steps=3)
        config, pipe = load_generator(GAN_CHECKPOINT)
        delivered = client.fetch(COUNTS, SEED, STEPS, delivery="seed")
        finished = finish(delivered, config, pipe, steps=STEPS, guidance=2.0, seed=SEED)
        assert np.array_equal(finished.images, client.generate(COUNTS, seed=SEED, steps=STEPS)[0])
    finally:
        server.stop(grace=1)


def test_a_device_with_other_weights_refuses_to_complete(service, generator):
    client, _ = service
    config, pipe = generator
    delivered = client.fetch(COUNTS, SEED, STEPS, delivery="seed")
    with pytest.raises(DigestMismatch, match="cannot be completed here"):
        finish(delivered, config, pipe, steps=STEPS, guidance=2.0, seed=SEED, digest="0" * 64)


def test_a_damaged_state_is_dropped_with_a_reason_never_completed(service):
    client, _ = service
    request = generation_pb2.GenerateRequest(class_counts=COUNTS, seed=SEED, steps=STEPS, guidance=2.0,
                                             delivery=generation_pb2.STATE, server_steps=3, state_bits=8)
    with grpc.insecure_channel(client.address) as channel:
        (batch,) = list(generation_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))
    truncated = generation_pb2.ImageBatch()
    truncated.CopyFrom(batch)
    truncated.state = batch.state[:-3]
    with pytest.raises(MalformedReply, match="cannot be decoded"):
        decode_reply([truncated], "state")
    flipped = bytearray(batch.state)
    flipped[-1] ^= 0xFF
    corrupted = generation_pb2.ImageBatch()
    corrupted.CopyFrom(batch)
    corrupted.state = bytes(flipped)
    with pytest.raises(MalformedReply):
        decode_reply([corrupted], "state")
    bad_noise = generation_pb2.ImageBatch()
    bad_noise.CopyFrom(batch)
    bad_noise.noise_var = float("nan")
    with pytest.raises(MalformedReply, match="noise variance"):
        decode_reply([bad_noise], "state")


def test_complete_refuses_states_that_do_not_fit(generator):
    config, pipe = generator
    labels = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="NaN"):
        complete(config, pipe, np.full((2, 1, 8, 8), np.nan, np.float32), labels, steps=6, resume_index=3)
    with pytest.raises(ValueError, match="do not fit"):
        complete(config, pipe, np.zeros((3, 1, 8, 8), np.float32), labels, steps=6, resume_index=3)
    with pytest.raises(ValueError, match="hand-off step must be in 1..5"):
        complete(config, pipe, np.zeros((2, 1, 8, 8), np.float32), labels, steps=6, resume_index=6)


def test_sample_command_splits_the_work_and_reports_it(tmp_path):
    out = tmp_path / "state.npz"
    done = subprocess.run([sys.executable, "-m", "fedfill", "generator", "sample", "--class", "4", "--n", "6",
                           "--steps", "6", "--seed", "2", "--delivery", "state", "--server-steps", "2",
                           "--state-bits", "4", "--out", str(out), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["server_unet_evals"] == 2 * 2 * 6 and figures["device_unet_evals"] == 2 * 4 * 6
    assert figures["downlink_bytes"] > payload_bytes([6 * 64], 4) and figures["device_seconds"] > 0
    assert np.load(out)["images"].shape == (6, 8, 8, 1)
    refused = subprocess.run([sys.executable, "-m", "fedfill", "generator", "sample", "--class", "4", "--n", "6",
                              "--steps", "6", "--delivery", "sketch", "--sketch-factor", "3", "--out",
                              str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "sketch_factor must divide" in refused.stderr


def test_a_sketch_is_renoised_from_a_stream_of_its_own(generator):
    """Re-noised almost to pure noise, a sketch must not come back as the very image it was
    cut from: torch keeps only a seed's low 32 bits, and an offset of 2**62 once drew the
    batch's own sampling noise again."""
    config, pipe = generator
    from generation.sample import complete_sketch, downsample

    labels = np.repeat(np.arange(10), 3)
    source = sample(config, pipe, labels, steps=STEPS, seed=0).astype(int)
    redrawn = complete_sketch(config, pipe, downsample(source.astype(np.uint8), 2), labels, steps=STEPS, seed=0,
                              resume_index=1)
    other_seed = sample(config, pipe, labels, steps=STEPS, seed=1).astype(int)
    assert np.abs(redrawn - source).mean() > 0.5 * np.abs(other_seed - source).mean()


@pytest.mark.slow
def test_a_run_with_seed_delivery_trains_on_the_very_images_of_image_delivery(tmp_path):
    """fedfill run with --delivery seed: each device generates its samples itself, the same
    images the service would have sent, so the run's accuracy is image delivery's to the
    digit; the reports say who sampled and what it cost."""
    rows = {}
    for delivery in ("image", "seed"):
        out = tmp_path / delivery
        done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--rounds", "1",
                               "--delivery", delivery, "--out", str(out), "--timeout", "400"],
                              cwd=ROOT, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, done.stdout + done.stderr
        with open(out / "rounds.csv") as fh:
            rows[delivery] = list(csv.DictReader(fh))[-1]
        with open(out / "devices.csv") as fh:
            rows[delivery + "-devices"] = list(csv.DictReader(fh))
    image, seed = rows["image"], rows["seed"]
    assert seed["accuracy"] == image["accuracy"] and seed["synthetic_used"] == image["synthetic_used"]
    assert int(image["gen_server_unet_evals"]) > 0 and int(image["gen_device_unet_evals"]) == 0
    assert int(seed["gen_server_unet_evals"]) == 0
    assert int(seed["gen_device_unet_evals"]) == int(image["gen_server_unet_evals"])
    assert float(seed["gen_device_energy_j"]) > 0 and float(image["gen_device_energy_j"]) == 0
    # a classifier device fetched the generator once: its weights' bytes are counted
    assert int(seed["gen_downlink_bytes"]) > 3 * 4_000_000 > int(image["gen_downlink_bytes"])
    assert all(int(d["gen_device_unet_evals"]) > 0 for d in rows["seed-devices"])


def test_run_refuses_a_delivery_it_cannot_make(tmp_path):
    for flags, reason in ((["--delivery", "video"], "--delivery video: choose one of image, sketch, state, seed"),
                          (["--delivery", "state", "--delivery-server-steps", "20"], "in 1..19 of the 20"),
                          (["--delivery", "state", "--delivery-state-bits", "1"], "must be in 2..32"),
                          (["--delivery", "sketch", "--delivery-sketch-factor", "3"], "divide the image size"),
                          (["--delivery", "seed", "--generator", "none"], "use --generator auto or HOST:PORT")):
        done = subprocess.run([sys.executable, "-m", "fedfill", "run", *flags, "--out", str(tmp_path / "x")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and reason in done.stderr, (flags, done.stderr[-500:])


@pytest.mark.slow
def test_a_run_with_delivery_auto_keeps_the_service_within_its_capacity(tmp_path):
    """--delivery auto with a service of 4,000 UNet passes a round: the planner gives some
    devices the service's images and has the others generate, and the service runs no more
    than it can; devices.csv says what each device was planned."""
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "4", "--rounds", "1", "--delivery",
                           "auto", "--delivery-server-passes", "4000", "--out", str(tmp_path), "--timeout", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "devices.csv") as fh:
        devices = [d for d in csv.DictReader(fh) if d["round"] == "1"]
    planned = {d["gen_planned"] for d in devices}
    assert "image" in planned and planned - {"image"}, planned
    assert sum(int(d["gen_server_unet_evals"]) for d in devices) <= 4000
    for device in devices:
        generated_here = int(device["gen_device_unet_evals"]) > 0
        assert generated_here == (device["gen_planned"] != "image"), device
