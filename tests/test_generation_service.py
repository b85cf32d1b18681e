"""The generation service over real gRPC sockets: streaming, cache, health, limits, queueing,
and a client that gives up cleanly when the service is down."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generation.client import GenerationClient, GenerationUnavailable
from generation.checkpoint import load_generator, save_checkpoint, weights_digest
from generation.config import DEFAULT_CHECKPOINT
from generation.service import GeneratorService, serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server, port, servicer = serve(DEFAULT_CHECKPOINT, 0, tmp_path_factory.mktemp("cache"))
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=1)


def test_generate_streams_the_requested_classes_and_caches_them(service):
    address, servicer = service
    client = GenerationClient(address, timeout_s=120)
    counts = [0, 5, 0, 300, 0, 0, 0, 0, 0, 2]  # more than one stream batch
    images, labels = client.generate(counts, seed=3, steps=8)
    assert images.shape == (307, 8, 8, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == counts
    computed = servicer.computed
    again_images, again_labels = client.generate(counts, seed=3, steps=8)
    assert servicer.computed == computed and servicer.cache_hits >= 1, "the same request is never computed twice"
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    other, _ = client.generate(counts, seed=4, steps=8)
    assert servicer.computed == computed + 1 and not np.array_equal(other, images)


def test_cache_key_follows_the_weights_not_the_files(service, tmp_path):
    """The key hashes the UNet's tensors and noise schedule: the same weights re-saved (new
    file bytes) keep it, one changed weight changes it."""
    import torch

    from generation import generation_pb2

    _, servicer = service
    config, pipe = load_generator(DEFAULT_CHECKPOINT)
    assert servicer.checkpoint_digest == weights_digest(pipe)
    resaved = tmp_path / "resaved"
    save_checkpoint(resaved, config, pipe.unet, noise_schedule=pipe.scheduler.config)
    request = generation_pb2.GenerateRequest(class_counts=[1] * 10, seed=0, steps=4, guidance=2.0)
    same = GeneratorService(resaved, tmp_path / "cache-a")
    assert same.cache_key(request) == servicer.cache_key(request)
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] += 1e-3
    changed = tmp_path / "changed"
    save_checkpoint(changed, config, pipe.unet, noise_schedule=pipe.scheduler.config)
    assert GeneratorService(changed, tmp_path / "cache-b").cache_key(request) != servicer.cache_key(request)


def test_health_check_says_serving(service):
    address, _ = service
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "fedfill.generation.Generator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("counts,steps,guidance,message", [
    ([1, 2, 3], 8, 2.0, "must list 10 classes"),
    ([0, -4, 0, 0, 0, 0, 0, 0, 0, 0], 8, 2.0, "class 1: negative count"),
    ([30_000] + [0] * 9, 8, 2.0, "at most 20000"),
    ([1] * 10, 0, 2.0, "steps must be"),
    ([1] * 10, 8, 99.0, "guidance must be"),
])
def test_bad_requests_get_a_clear_status_and_the_service_keeps_serving(service, counts, steps, guidance, message):
    address, _ = service
    client = GenerationClient(address, timeout_s=30, retries=0)
    with pytest.raises(GenerationUnavailable, match="INVALID_ARGUMENT") as err:
        client.generate(counts, steps=steps, guidance=guidance)
    assert message in str(err.value)
    images, _ = client.generate([1] + [0] * 9, seed=11, steps=4)
    assert len(images) == 1


def test_concurrent_requests_queue_instead_of_failing(service):
    address, _ = service
    results, errors = [], []

    def ask(seed):
        try:
            results.append(GenerationClient(address, timeout_s=120).generate([3] * 10, seed=100 + seed, steps=6))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4
    assert all(images.shape == (30, 8, 8, 1) for images, _ in results)


def test_a_service_that_is_down_raises_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(GenerationUnavailable, match="UNAVAILABLE"):
        GenerationClient(f"127.0.0.1:{dead}", timeout_s=5, retries=1, backoff_s=0.1).generate([1] * 10)
    assert time.monotonic() - started < 30


def test_serve_command_runs_as_its_own_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "fedfill", "generator", "serve", "--port", str(port),
                                "--cache", str(tmp_path / "cache")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            except grpc.RpcError:
                assert process.poll() is None and time.monotonic() < deadline, "the service never came up"
                time.sleep(0.5)
        images, labels = GenerationClient(f"127.0.0.1:{port}").generate([0, 0, 4, 0, 0, 0, 0, 0, 0, 0], steps=5)
        assert labels.tolist() == [2] * 4 and images.shape == (4, 8, 8, 1)
        assert any((tmp_path / "cache").glob("*.npz"))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_sliced_request_is_bit_for_bit_the_whole_one():
    """The service samples a request in slices of 256 (sample's batch): the same images as one
    call over the whole request, for images and for hand-off states."""
    from generation.sample import sample, sample_until

    config, pipe = load_generator(DEFAULT_CHECKPOINT)
    labels = np.arange(300) % config.num_classes
    whole = sample(config, pipe, labels, steps=1, seed=5)
    sliced = np.concatenate([sample(config, pipe, labels[a:a + 256], steps=1, seed=5, first_index=a)
                             for a in range(0, 300, 256)])
    assert np.array_equal(whole, sliced)
    states = sample_until(config, pipe, labels, steps=2, seed=5, stop_index=1)
    assert np.array_equal(states[256:], sample_until(config, pipe, labels[256:], steps=2, seed=5, stop_index=1,
                                                     first_index=256))
    with pytest.raises(ValueError, match="batch boundary"):
        sample(config, pipe, labels[:10], steps=2, first_index=100)


@pytest.mark.slow
@pytest.mark.parametrize("slice_images", [256, 0])
def test_a_small_request_beside_a_large_one_waits_for_a_slice_not_the_whole(tmp_path, slice_images):
    """With slices a 10-image request asked just after a 2,560-image one finishes first; with
    a whole request a turn (0, the service before slicing) it finishes last."""
    server, port, servicer = serve(DEFAULT_CHECKPOINT, 0, tmp_path, slice_images=slice_images)
    address, finished = f"127.0.0.1:{port}", []
    try:
        def ask(name, counts, seed):
            GenerationClient(address, timeout_s=300).generate(counts, seed=seed, steps=4)
            finished.append(name)

        large = threading.Thread(target=ask, args=("large", [256] * 10, 1))
        large.start()
        deadline = time.monotonic() + 60
        while servicer.turns.waiting() == 0 and time.monotonic() < deadline:  # the large one is sampling
            time.sleep(0.01)
        ask("small", [1] * 10, 2)
        large.join(timeout=600)
    finally:
        server.stop(grace=1)
    assert finished == (["small", "large"] if slice_images else ["large", "small"])


def test_a_cancelled_request_stops_sampling_at_its_next_slice(tmp_path):
    server, port, servicer = serve(DEFAULT_CHECKPOINT, 0, tmp_path)
    try:
        from generation import generation_pb2

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_stream("/fedfill.generation.Generator/Generate",
                                    request_serializer=generation_pb2.GenerateRequest.SerializeToString,
                                    response_deserializer=generation_pb2.ImageBatch.FromString)
        stream = call(generation_pb2.GenerateRequest(class_counts=[512] * 10, seed=3, steps=20, guidance=2.0))
        deadline = time.monotonic() + 60
        while servicer.turns.waiting() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.cancel()
        deadline = time.monotonic() + 120
        while servicer.abandoned == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        channel.close()
    finally:
        server.stop(grace=1)
    assert servicer.abandoned == 1 and servicer.computed == 0  # 20 slices asked, stopped after the first


def test_a_call_that_runs_out_of_time_is_not_retried_from_nothing():
    """The client alone, against a gRPC servicer slower than its deadline: one call, not three
    (an expired call is neither finished nor cached by the real service)."""
    from concurrent import futures

    from generation import generation_pb2_grpc

    calls = []

    class Slow(generation_pb2_grpc.GeneratorServicer):
        def Generate(self, request, context):
            calls.append(time.monotonic())
            time.sleep(1.5)
            return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generation_pb2_grpc.add_GeneratorServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(GenerationUnavailable, match="DEADLINE_EXCEEDED"):
            GenerationClient(f"127.0.0.1:{port}", timeout_s=0.3, retries=2, backoff_s=0.05).generate([1] * 10)
        time.sleep(1.0)  # a retry, had there been one, would have arrived by now
        assert len(calls) == 1, "an expired call was asked again"
    finally:
        server.stop(grace=0)
