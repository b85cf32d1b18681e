"""The generation service: gRPC `Generate` streams uint8 image batches with their labels,
with gRPC health checking, a content-addressed cache on disk, and limits on what one
request may ask.

The cache key is a hash of the checkpoint's weights (the UNet's tensors as loaded, and the
noise schedule; or a GAN generator's tensors) and the request (counts, seed, steps, guidance,
sampler), so the same request is computed once, ever, and a new checkpoint never serves stale
images. A GAN checkpoint is served alike: steps and guidance are checked, then ignored.

Sampling is fair: one slice of SLICE_IMAGES images at a time, the requests that wait taking
turns slice by slice in the order they asked (Turns). A 10-image request beside a
20,000-image one waits for one slice, not the whole of it; none fails for waiting. A request
whose client has gone (cancelled, or past its deadline) stops at its next slice. Per client:
at most MAX_IMAGES_PER_REQUEST images a request and MAX_CONCURRENT_RPCS calls at once over
all clients (gRPC's own limit); a slice is the most a request can hold the others up.

Delivery [MEG]: a request names how its samples reach the device. IMAGE (the default, what an
old client gets) streams finished images; SKETCH the same images downsampled; STATE the
sampler's state after `server_steps` steps, through fedfill's codec at `state_bits`, with the
codec's exact expected error; SEED only the labels, the sampler and the checkpoint digest, from
which a device holding the same weights makes the very images IMAGE would have sent. Every
reply names the checkpoint digest, and the first batch the work the request cost the server
(UNet passes, sampling seconds) for the device's report.

Every request comes from an untrusted peer, so each way it can be wrong ends in a status
with a reason and the service goes on serving: bytes that are no GenerateRequest and
requests outside the limits get INVALID_ARGUMENT (checked before any sampling), a message
over MAX_REQUEST_BYTES or more than MAX_CONCURRENT_RPCS calls at once get
RESOURCE_EXHAUSTED from gRPC itself, and an unexpected failure while sampling gets INTERNAL.
Unknown fields are ignored, as protobuf's forward compatibility asks. A request whose
client has gone while it queued is never sampled, and a cache entry is written whole or
not at all (write_cache_entry).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import zipfile
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedfill.codec import MAX_BITS, MIN_BITS, encode, expected_squared_error

from . import generation_pb2, generation_pb2_grpc
from .checkpoint import load_generator, weights_digest

LOG = logging.getLogger("fedfill.generation")
SERVICE_NAME = "fedfill.generation.Generator"
MAX_IMAGES_PER_REQUEST = 20_000
# A real request takes about 10 bytes per class; one this large is hostile, and gRPC refuses
# it before it is read into memory.
MAX_REQUEST_BYTES = 64 * 1024
MAX_SEED = 2 ** 40  # sample() seeds torch with seed * 1_000_003 + an image index, which must fit in 64 bits
# Calls past this many at once are refused (RESOURCE_EXHAUSTED) instead of queueing without bound.
MAX_CONCURRENT_RPCS = 64
STREAM_BATCH = 256
SLICE_IMAGES = 256  # images sampled per turn: sample()'s batch, so a sliced request is bit for bit the whole


class Turns:
    """One slice of sampling at a time, in the order the threads asked: a thread that finished
    a slice queues again behind the others. (A plain Lock gives no order: the thread that just
    released it may take it straight back, and a large request holds the rest up to the end.)"""

    def __init__(self):
        self._changed = threading.Condition()
        self._queue: collections.deque = collections.deque()

    def waiting(self) -> int:
        """Requests sampling or waiting for a slice now (the one sampling among them)."""
        with self._changed:
            return len(self._queue)

    @contextmanager
    def turn(self):
        me = object()
        with self._changed:
            self._queue.append(me)
            self._changed.wait_for(lambda: self._queue[0] is me)
        try:
            yield
        finally:
            with self._changed:
                self._queue.popleft()
                self._changed.notify_all()
PARTIAL_SUFFIX = ".part"  # a cache entry being written; a leftover one is removed at start


def write_cache_entry(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one cache entry whole or not at all: into a temporary file beside `path`, flushed
    to disk, then renamed over it (atomic on POSIX). A failure or a kill mid-write leaves no
    entry, only at most a *.part file, which the next start removes (remove_partial_entries)."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, images=images, labels=labels)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def read_cache_entry(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) of a cached entry, or None; one that does not load (a disk fault, a
    foreign file) is dropped so that it is computed again."""
    if not path.exists():
        return None
    try:
        with np.load(path) as cached:
            return cached["images"], cached["labels"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        LOG.warning("dropping unreadable cache entry %s: %s", path.name, err)
        path.unlink(missing_ok=True)
        return None


def remove_partial_entries(cache_dir: Path) -> int:
    """Delete what a killed service left half-written; returns how many files."""
    leftovers = list(cache_dir.glob(f"*{PARTIAL_SUFFIX}"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


class GeneratorService(generation_pb2_grpc.GeneratorServicer):
    def __init__(self, checkpoint: str | Path, cache_dir: str | Path, sampler: str = "ddim",
                 max_images: int = MAX_IMAGES_PER_REQUEST, slice_images: int = SLICE_IMAGES):
        self.config, self.pipe = load_generator(checkpoint)
        self.checkpoint_digest = weights_digest(self.pipe)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if removed := remove_partial_entries(self.cache_dir):
            LOG.warning("removed %d half-written cache files in %s", removed, self.cache_dir)
        if slice_images < 0 or slice_images % SLICE_IMAGES:
            raise ValueError(f"slice_images must be a multiple of {SLICE_IMAGES} (0: a whole request a turn), "
                             f"got {slice_images}")
        # 0: a whole request in one turn, the service as it was before slicing (the bench's baseline)
        self.sampler, self.max_images, self.slice_images = sampler, max_images, slice_images
        self.turns = Turns()
        self.counting = threading.Lock()  # the counters below, updated from every request's thread
        self.computed = self.cache_hits = self.abandoned = 0
        self.server_unet_evals, self.sampling_seconds = 0, 0.0  # totals, for the report and the bench

    def check(self, request) -> str | None:
        """Why the request cannot be served, or None."""
        counts = list(request.class_counts)
        if len(counts) != self.config.num_classes:
            return f"class_counts must list {self.config.num_classes} classes, got {len(counts)}"
        if any(c < 0 for c in counts):
            bad = next(i for i, c in enumerate(counts) if c < 0)
            return f"class {bad}: negative count {counts[bad]}"
        if sum(counts) > self.max_images:
            return f"{sum(counts)} images asked, at most {self.max_images} per request"
        max_steps = min(1000, self.config.train_timesteps)
        if not 1 <= request.steps <= max_steps:
            return f"steps must be in 1..{max_steps}, got {request.steps}"
        if not (np.isfinite(request.guidance) and 0.0 <= request.guidance <= 20.0):
            return f"guidance must be in [0, 20], got {request.guidance}"
        if not 0 <= request.seed <= MAX_SEED:
            return f"seed must be in 0..{MAX_SEED}, got {request.seed}"
        return self.check_delivery(request)

    def check_delivery(self, request) -> str | None:
        delivery = request.delivery
        if delivery not in generation_pb2.Delivery.values():
            return f"unknown delivery {delivery}; one of {', '.join(generation_pb2.Delivery.keys())}"
        if delivery in (generation_pb2.STATE, generation_pb2.SKETCH):
            from .sample import SPLIT_SAMPLER

            name = generation_pb2.Delivery.Name(delivery)
            if self.config.model != "ddpm":
                return f"{name}: a GAN draws an image in one pass, there are no sampler steps to split; ask for IMAGE or SEED"
            if self.sampler != SPLIT_SAMPLER:
                return f"{name}: only a {SPLIT_SAMPLER} sampler can be split, this service samples with {self.sampler}"
            if not 1 <= request.server_steps <= request.steps - 1:
                return f"{name}: server_steps must be in 1..{request.steps - 1} of {request.steps} steps, " \
                       f"got {request.server_steps}"
        if delivery == generation_pb2.STATE and not MIN_BITS <= request.state_bits <= MAX_BITS:
            return f"STATE: state_bits must be in {MIN_BITS}..{MAX_BITS}, got {request.state_bits}"
        if delivery == generation_pb2.SKETCH:
            factor, size = request.sketch_factor, self.config.image_size
            if not (2 <= factor <= size and size % factor == 0):
                return f"SKETCH: sketch_factor must divide the image size {size} and be at least 2, got {factor}"
        return None

    def cache_key(self, request) -> str:
        """Images are cached under the request that made them, whatever their delivery (a
        sketch or a seed reply is cut from or stands for those images); a STATE's float32
        states under the request and its hand-off step (the bits are applied when sending)."""
        key = {"checkpoint": self.checkpoint_digest, "counts": list(request.class_counts), "seed": request.seed,
               "steps": request.steps, "guidance": round(float(request.guidance), 6), "sampler": self.sampler}
        if request.delivery == generation_pb2.STATE:
            key["state_after"] = request.server_steps
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def images_for(self, request, context=None) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(images, labels, from_cache), or None when the client (`context`) left while the
        request queued: it is then not sampled. For a STATE request the "images" are the
        float32 states [n, C, H, W] after its server steps."""
        result = self._produce(request, context)
        return None if result is None else result[:3]

    def _produce(self, request, context=None):
        """images_for's answer and the work it cost: (images, labels, from_cache, passes, seconds),
        sampled slice by slice in turns with the other requests; None when the client left."""
        path = self.cache_dir / f"{self.cache_key(request)}.npz"
        labels = np.repeat(np.arange(self.config.num_classes), list(request.class_counts))
        size = self.slice_images or max(len(labels), 1)
        parts, seconds = [], 0.0
        for start in range(0, max(len(labels), 1), size):
            with self.turns.turn():
                if start == 0:  # in its turn: a request another one just finished is served from disk
                    cached = read_cache_entry(path)
                    if cached is not None:
                        with self.counting:
                            self.cache_hits += 1
                        return *cached, True, 0, 0.0
                if context is not None and not context.is_active():
                    with self.counting:
                        self.abandoned += 1
                    if start:
                        LOG.info("client left: stopped after %d of %d images", start, len(labels))
                    return None
                started = time.perf_counter()
                parts.append(self._sample_slice(request, labels[start:start + size], start))
                seconds += time.perf_counter() - started
        images = np.concatenate(parts)
        if request.delivery == generation_pb2.STATE:
            passes = 2 * request.server_steps * len(labels)
        else:
            passes = len(labels) if self.config.model == "gan" else 2 * request.steps * len(labels)
        try:
            write_cache_entry(path, images, labels)
        except OSError as err:  # the cache is an optimisation: serve the images anyway
            LOG.warning("could not cache %s: %s", path.name, err)
        with self.counting:
            self.computed += 1
            self.server_unet_evals += passes
            self.sampling_seconds += seconds
        return images, labels, False, passes, seconds

    def _sample_slice(self, request, labels: np.ndarray, first_index: int) -> np.ndarray:
        from .sample import sample, sample_until  # torch and diffusers: loaded with the checkpoint, not on import

        if request.delivery == generation_pb2.STATE:
            return sample_until(self.config, self.pipe, labels, steps=request.steps, guidance=request.guidance,
                                seed=request.seed, stop_index=request.server_steps, first_index=first_index)
        return sample(self.config, self.pipe, labels, steps=request.steps, guidance=request.guidance,
                      seed=request.seed, sampler=self.sampler, first_index=first_index)

    def Generate(self, request, context):
        problem = self.check(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        size, channels = self.config.image_size, self.config.channels
        common = {"delivery": request.delivery, "checkpoint_digest": self.checkpoint_digest, "sampler": self.sampler}
        if request.delivery == generation_pb2.SEED:  # nothing to compute: the device makes them
            labels = np.repeat(np.arange(self.config.num_classes), list(request.class_counts))
            LOG.info("served the seed of %d images", len(labels))
            for start in range(0, max(len(labels), 1), STREAM_BATCH):
                yield generation_pb2.ImageBatch(labels=labels[start:start + STREAM_BATCH].tolist(), height=size,
                                                width=size, channels=channels, **common)
            return
        try:
            result = self._produce(request, context)
        except Exception as err:  # noqa: BLE001 - any failure becomes a status, the service goes on
            LOG.exception("generation failed")
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(err).__name__}: {err}")
        if result is None:
            LOG.info("client left before its request was sampled")
            return
        images, labels, cached, passes, seconds = result
        LOG.info("served %d %s (%s)", len(labels), generation_pb2.Delivery.Name(request.delivery).lower(),
                 "cache" if cached else "computed")
        height = width = size
        if request.delivery in (generation_pb2.STATE, generation_pb2.SKETCH):
            common["resume_index"] = request.server_steps
        if request.delivery == generation_pb2.STATE:
            common["timestep"] = self.handoff_timestep(request.steps, request.server_steps)
        elif request.delivery == generation_pb2.SKETCH:  # cut from the (cached) images: the same for the same request
            from .sample import downsample

            images = downsample(images, request.sketch_factor)
            height = width = size // request.sketch_factor
        for start in range(0, max(len(labels), 1), STREAM_BATCH):
            chunk, chunk_labels = images[start:start + STREAM_BATCH], labels[start:start + STREAM_BATCH].tolist()
            work = {"server_unet_evals": passes, "server_seconds": seconds} if start == 0 else {}
            if request.delivery == generation_pb2.STATE:
                # the codec's rounding draws from the request: the same request, the same bytes
                payload = encode([chunk], request.state_bits, np.random.default_rng([request.seed, start]))
                noise_var = expected_squared_error([chunk], request.state_bits) / max(chunk.size, 1)
                yield generation_pb2.ImageBatch(state=payload, labels=chunk_labels, height=size, width=size,
                                                channels=channels, from_cache=cached, noise_var=noise_var, **common,
                                                **work)
            else:
                yield generation_pb2.ImageBatch(images=chunk.tobytes(), labels=chunk_labels, height=height,
                                                width=width, channels=channels, from_cache=cached, **common, **work)

    def handoff_timestep(self, steps: int, index: int) -> int:
        """The training timestep of the state after `index` of `steps` sampler steps."""
        from .pipeline import make_scheduler

        scheduler = make_scheduler(self.sampler, self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return int(scheduler.timesteps[index])

    def generate_from_bytes(self, data: bytes, context):
        """Generate for the raw request bytes: parsing them here (not in gRPC's deserializer,
        which answers INTERNAL) lets bytes that are no GenerateRequest get INVALID_ARGUMENT."""
        request = generation_pb2.GenerateRequest()
        try:
            request.ParseFromString(data)
        except DecodeError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a GenerateRequest ({len(data)} bytes): {err}")
        yield from self.Generate(request, context)


def serve(checkpoint: str | Path, port: int, cache_dir: str | Path, host: str = "127.0.0.1", workers: int = 8,
          max_images: int = MAX_IMAGES_PER_REQUEST, sampler: str = "ddim", slice_images: int = SLICE_IMAGES):
    """Start the server (returns it; call .wait_for_termination() to block)."""
    service = GeneratorService(checkpoint, cache_dir, sampler=sampler, max_images=max_images,
                               slice_images=slice_images)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                         options=[("grpc.max_send_message_length", 64 * 1024 * 1024),
                                  ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  # notice peers that vanished without closing (a pulled cable)
                                  ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)])
    generate = grpc.unary_stream_rpc_method_handler(service.generate_from_bytes, request_deserializer=None,
                                                    response_serializer=generation_pb2.ImageBatch.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Generate": generate}),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, service
