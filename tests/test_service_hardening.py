"""The generation service under hostile input and under load, over real gRPC, with the
service in a process of its own (bench/fuzz_service.py's ServiceProcess): each hostile
request gets a clear status and the service goes on serving; 8 clients at once are all
served; a client that leaves mid-request costs nothing afterwards; memory stays bounded; the
cache holds only whole entries, even after a kill."""

import math
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from bench.bench_service_load import measure_load
from bench.fuzz_service import (FUZZ_MAX_IMAGES, ServiceProcess, call_raw, fuzz_generate, images_in, padded_to,
                                request_bytes, unknown_field)
from generation.client import GenerationClient
from generation.service import (MAX_CONCURRENT_RPCS, MAX_REQUEST_BYTES, MAX_SEED, PARTIAL_SUFFIX, read_cache_entry,
                                remove_partial_entries, write_cache_entry)

LIMIT = FUZZ_MAX_IMAGES
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with ServiceProcess(tmp_path_factory.mktemp("cache"), max_images=LIMIT) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.address) as opened:
        yield opened


def one_image(service, seed: int = 0, **fields) -> bytes:
    return request_bytes([1] + [0] * (service.num_classes - 1), seed=seed, **fields)


def served(channel, service, data: bytes) -> int:
    return images_in(call_raw(channel, data, timeout_s=120), service.image_shape)


def cache_entries(service) -> set:
    return set(service.cache_dir.glob("*.npz"))


def assert_whole_entries(cache_dir):
    """Every file in the cache is an entry that loads, with one label per image: uint8 images,
    or a STATE request's float32 states [n, C, H, W] (the fuzzer sends valid hand-offs too)."""
    for path in cache_dir.iterdir():
        assert path.suffix == ".npz", f"{path.name} is no cache entry"
        entry = read_cache_entry(path)
        assert entry is not None, f"{path.name} does not load"
        images, labels = entry
        assert images.dtype == np.uint8 or (images.dtype == np.float32 and images.ndim == 4), images.dtype
        assert len(images) == len(labels)


HOSTILE = {  # name: (request fields, the status, words its message must hold)
    "no classes": (dict(counts=[]), INVALID, "must list 10 classes, got 0"),
    "more classes than the model": (dict(counts=[1] * 11), INVALID, "must list 10 classes, got 11"),
    "a negative count": (dict(counts=[0, 0, 0, -5] + [0] * 6), INVALID, "class 3: negative count -5"),
    "the smallest int64": (dict(counts=[-2 ** 63] + [0] * 9), INVALID, "negative count"),
    "10^9 images": (dict(counts=[10 ** 8] * 10), INVALID, f"1000000000 images asked, at most {LIMIT}"),
    "int64's largest in every class": (dict(counts=[2 ** 63 - 1] * 10), INVALID, "images asked"),
    "one over the image limit": (dict(counts=[LIMIT - 1, 2] + [0] * 8), INVALID, f"{LIMIT + 1} images asked"),
    "zero steps": (dict(counts=[1] + [0] * 9, steps=0), INVALID, "steps must be in 1..1000, got 0"),
    "negative steps": (dict(counts=[1] + [0] * 9, steps=-3), INVALID, "got -3"),
    "huge steps": (dict(counts=[1] + [0] * 9, steps=2 ** 31 - 1), INVALID, "steps must be"),
    "NaN guidance": (dict(counts=[1] + [0] * 9, guidance=math.nan), INVALID, "guidance must be in [0, 20], got nan"),
    "infinite guidance": (dict(counts=[1] + [0] * 9, guidance=math.inf), INVALID, "got inf"),
    "negative guidance": (dict(counts=[1] + [0] * 9, guidance=-1.0), INVALID, "guidance must be"),
    "huge guidance": (dict(counts=[1] + [0] * 9, guidance=3e38), INVALID, "guidance must be"),
    "a negative seed": (dict(counts=[1] + [0] * 9, seed=-1), INVALID, f"seed must be in 0..{MAX_SEED}"),
    "a seed too large for torch": (dict(counts=[1] + [0] * 9, seed=2 ** 63 - 1), INVALID, "seed must be"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_request_gets_a_clear_status_and_the_service_keeps_serving(service, channel, name):
    fields, code, words = HOSTILE[name]
    with pytest.raises(grpc.RpcError) as refused:
        call_raw(channel, request_bytes(**fields))
    assert refused.value.code() == code and words in refused.value.details()
    assert served(channel, service, one_image(service)) == 1


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x0a\x05\x01", b"\x08", bytes(range(256)),
                                  np.random.default_rng(5).bytes(120)], ids=["ff", "short-length", "no-varint",
                                                                             "0-255", "random"])
def test_bytes_that_are_no_request_get_invalid_argument(service, channel, data):
    """Parsed by the service, not by gRPC's deserializer (which would answer INTERNAL)."""
    with pytest.raises(grpc.RpcError) as refused:
        call_raw(channel, data)
    assert refused.value.code() == INVALID and "not a GenerateRequest" in refused.value.details()
    assert served(channel, service, one_image(service)) == 1


def test_unknown_fields_are_ignored(service, channel):
    extra = unknown_field(99, 0, 7) + unknown_field(12345, 2, b"hello") + unknown_field(2 ** 29 - 1, 5, b"\0" * 4)
    assert served(channel, service, one_image(service) + extra) == 1


def test_a_request_of_exactly_the_byte_limit_is_served_and_one_byte_more_is_refused(service, channel):
    at_limit = padded_to(one_image(service, seed=1), MAX_REQUEST_BYTES)
    assert len(at_limit) == MAX_REQUEST_BYTES
    assert served(channel, service, at_limit) == 1
    for size in (MAX_REQUEST_BYTES + 1, 10 * MAX_REQUEST_BYTES):
        with pytest.raises(grpc.RpcError) as refused:
            call_raw(channel, padded_to(one_image(service, seed=1), size))
        assert refused.value.code() == EXHAUSTED and str(MAX_REQUEST_BYTES) in refused.value.details()
    assert served(channel, service, one_image(service, seed=2)) == 1


def test_a_request_of_exactly_the_image_limit_is_served(service, channel):
    assert served(channel, service, request_bytes([LIMIT - 3, 3] + [0] * 8, steps=2)) == LIMIT


def test_a_fuzzed_sample_gets_statuses_only(service):
    result = fuzz_generate(200, seed=13, service=service)
    assert result["tried"] == 200 and result["accepted"] + sum(result["rejected"].values()) == 200
    assert (result["crashes"], result["hangs"], result["server_errors"], result["wrong"]) == (0, 0, 0, 0), \
        result["examples"]
    assert result["accepted"] > 0 and result["rejected"]["INVALID_ARGUMENT"] > 100
    assert len(result["by_kind"]) >= 10 and result["serving_after"]


@pytest.mark.slow
def test_eight_clients_at_once_are_all_served(service):
    load = measure_load(service, clients=8, requests_per_client=2, first_seed=500)
    assert load["errors"] == [] and load["wrong"] == []
    assert load["requests"] == 16 and load["requests_per_s"] > 0 and load["p95_s"] >= load["p50_s"]
    assert service.serving()


@pytest.mark.slow
def test_clients_that_leave_mid_request_cost_nothing_afterwards(service):
    """A is cancelled while it samples, B's channel closes while B queues behind A: A's images
    are still cached whole, B is never sampled, and the next request is served."""
    before = cache_entries(service)
    generate = lambda opened: opened.unary_stream("/fedfill.generation.Generator/Generate")  # noqa: E731
    a_channel, b_channel = grpc.insecure_channel(service.address), grpc.insecure_channel(service.address)
    a_call = generate(a_channel)(request_bytes([LIMIT] + [0] * 9, steps=150, seed=900), timeout=300)
    time.sleep(0.5)  # A samples now (the service was idle), for seconds
    b_call = generate(b_channel)(request_bytes([LIMIT] + [0] * 9, steps=150, seed=901), timeout=300)
    time.sleep(0.3)
    a_call.cancel()
    b_channel.close()
    for call in (a_call, b_call):
        with pytest.raises(grpc.RpcError) as left:
            list(call)
        assert left.value.code() == grpc.StatusCode.CANCELLED
    a_channel.close()
    with grpc.insecure_channel(service.address) as fresh:
        assert served(fresh, service, one_image(service, seed=902)) == 1  # waits for A's sampling to end
    new = cache_entries(service) - before
    assert len(new) == 2, "A's entry and the last request's; none for B, which was never sampled"
    assert_whole_entries(service.cache_dir)
    assert service.serving()


@pytest.mark.slow
def test_calls_past_the_concurrency_limit_are_refused_not_queued(service):
    """The limit bounds what waits in the service; a client told RESOURCE_EXHAUSTED retries."""
    with grpc.insecure_channel(service.address) as opened:
        generate = opened.unary_stream("/fedfill.generation.Generator/Generate")
        waiting = [generate(request_bytes([LIMIT] + [0] * 9, steps=60, seed=950), timeout=300)
                   for _ in range(MAX_CONCURRENT_RPCS)]
        # Probe until the waiting calls have all reached the service (under CI's load that took
        # over a second once): a probe served meanwhile came within the limit, as it should.
        deadline, served_probes = time.monotonic() + 120, 0
        while True:
            try:
                call_raw(opened, one_image(service, seed=951), timeout_s=60)
                served_probes += 1
            except grpc.RpcError as refused:
                assert refused.code() == EXHAUSTED and "limit" in refused.details().lower(), refused
                break
            assert time.monotonic() < deadline, f"{MAX_CONCURRENT_RPCS} calls waiting, none refused ({served_probes} served)"
            time.sleep(0.5)
        for call in waiting:
            call.cancel()
    images, _ = GenerationClient(service.address, timeout_s=120, retries=6, backoff_s=0.5).generate(
        [1] + [0] * 9, seed=951, steps=1)
    assert len(images) == 1 and service.serving()


@pytest.mark.slow
def test_memory_stays_bounded_over_many_requests(service):
    with grpc.insecure_channel(service.address) as opened:  # warm: the largest batch this service samples
        served(opened, service, request_bytes([LIMIT] + [0] * 9, steps=1, seed=700))
    before = service.rss_bytes()
    fuzzed = fuzz_generate(600, seed=21, service=service)
    load = measure_load(service, clients=8, requests_per_client=2, first_seed=800)
    after = service.rss_bytes()
    assert fuzzed["crashes"] == fuzzed["hangs"] == fuzzed["server_errors"] == 0 and not load["errors"]
    assert after - before < 64 * 2 ** 20, f"RSS grew from {before / 2 ** 20:.0f} to {after / 2 ** 20:.0f} MiB"


@pytest.mark.slow
def test_a_killed_service_leaves_only_whole_entries_and_its_successor_serves(tmp_path):
    cache = tmp_path / "cache"
    first = ServiceProcess(cache, max_images=LIMIT)
    try:
        stop = threading.Event()

        def ask_until_killed():  # many small new requests: entries are written all the time
            with grpc.insecure_channel(first.address) as opened:
                for seed in range(10_000):
                    if stop.is_set():
                        return
                    try:
                        call_raw(opened, one_image(first, seed=seed), timeout_s=60)
                    except grpc.RpcError:
                        return

        asking = threading.Thread(target=ask_until_killed)
        asking.start()
        time.sleep(4.0)
        os.kill(first.pid, signal.SIGKILL)
        stop.set()
        asking.join(timeout=60)
    finally:
        first.kill()
        first.stop()
    assert any(cache.glob("*.npz")), "some entries were written before the kill"
    assert all(path.suffix in (".npz", PARTIAL_SUFFIX) for path in cache.iterdir())
    with ServiceProcess(cache, max_images=LIMIT) as successor:
        assert_whole_entries(cache)  # the successor removed any half-written file
        with grpc.insecure_channel(successor.address) as opened:
            assert served(opened, successor, one_image(successor, seed=0)) == 1


# ---------------------------------------------------------------- the cache's files, one function at a time

def test_a_cache_entry_is_written_whole(tmp_path):
    images, labels = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1), np.array([3, 4])
    write_cache_entry(tmp_path / "key.npz", images, labels)
    got_images, got_labels = read_cache_entry(tmp_path / "key.npz")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert [path.name for path in tmp_path.iterdir()] == ["key.npz"]


@pytest.mark.parametrize("fails_in", ["savez", "replace"])
def test_a_write_that_fails_midway_leaves_no_entry_and_no_partial_file(tmp_path, monkeypatch, fails_in):
    def half_written(out, **arrays):
        out.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    def no_rename(*args):
        raise OSError("rename failed")

    if fails_in == "savez":
        monkeypatch.setattr(np, "savez", half_written)
    else:
        monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        write_cache_entry(tmp_path / "key.npz", np.zeros((1, 8, 8, 1), np.uint8), np.array([0]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a zip", b"not a zip at all"])
def test_an_unreadable_entry_is_dropped_to_be_computed_again(tmp_path, content):
    path = tmp_path / "key.npz"
    path.write_bytes(content)
    assert read_cache_entry(path) is None and not path.exists()


def test_what_a_killed_writer_left_is_removed_and_entries_kept(tmp_path):
    write_cache_entry(tmp_path / "kept.npz", np.zeros((1, 8, 8, 1), np.uint8), np.array([0]))
    (tmp_path / f"kept.x1y2{PARTIAL_SUFFIX}").write_bytes(b"half")
    assert remove_partial_entries(tmp_path) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["kept.npz"]
