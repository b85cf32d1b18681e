"""The generation service: gRPC `Generate` streams uint8 image batches with their labels,
with gRPC health checking, a content-addressed cache on disk, and limits on what one
request may ask.

The cache key is a hash of the checkpoint's weights (the UNet's tensors as loaded, and the
noise schedule; or a GAN generator's tensors) and the request (counts, seed, steps, guidance,
sampler), so the same request is computed once, ever, and a new checkpoint never serves stale
images. A GAN checkpoint is served alike: steps and guidance are checked, then ignored. Sampling holds one lock: concurrent requests queue, none fails for it.

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

import hashlib
import json
import logging
import os
import tempfile
import threading
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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
                 max_images: int = MAX_IMAGES_PER_REQUEST):
        self.config, self.pipe = load_generator(checkpoint)
        self.checkpoint_digest = weights_digest(self.pipe)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if removed := remove_partial_entries(self.cache_dir):
            LOG.warning("removed %d half-written cache files in %s", removed, self.cache_dir)
        self.sampler, self.max_images = sampler, max_images
        self.lock = threading.Lock()
        self.computed = self.cache_hits = self.abandoned = 0

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
        return None

    def cache_key(self, request) -> str:
        key = {"checkpoint": self.checkpoint_digest, "counts": list(request.class_counts), "seed": request.seed,
               "steps": request.steps, "guidance": round(float(request.guidance), 6), "sampler": self.sampler}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def images_for(self, request, context=None) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(images, labels, from_cache), or None when the client (`context`) left while the
        request queued: it is then not sampled."""
        path = self.cache_dir / f"{self.cache_key(request)}.npz"
        with self.lock:
            cached = read_cache_entry(path)
            if cached is not None:
                self.cache_hits += 1
                return *cached, True
            if context is not None and not context.is_active():
                self.abandoned += 1
                return None
            from .sample import sample  # torch and diffusers: loaded with the checkpoint, not on import

            labels = np.repeat(np.arange(self.config.num_classes), list(request.class_counts))
            images = sample(self.config, self.pipe, labels, steps=request.steps, guidance=request.guidance,
                            seed=request.seed, sampler=self.sampler)
            try:
                write_cache_entry(path, images, labels)
            except OSError as err:  # the cache is an optimisation: serve the images anyway
                LOG.warning("could not cache %s: %s", path.name, err)
            self.computed += 1
            return images, labels, False

    def Generate(self, request, context):
        problem = self.check(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            result = self.images_for(request, context)
        except Exception as err:  # noqa: BLE001 - any failure becomes a status, the service goes on
            LOG.exception("generation failed")
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(err).__name__}: {err}")
        if result is None:
            LOG.info("client left before its request was sampled")
            return
        images, labels, cached = result
        LOG.info("served %d images (%s)", len(labels), "cache" if cached else "computed")
        n, h, w, c = images.shape if len(images) else (0, self.config.image_size, self.config.image_size, self.config.channels)
        for start in range(0, max(n, 1), STREAM_BATCH):
            chunk = images[start:start + STREAM_BATCH]
            yield generation_pb2.ImageBatch(images=chunk.tobytes(), labels=labels[start:start + STREAM_BATCH].tolist(),
                                            height=h, width=w, channels=c, from_cache=cached)

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
          max_images: int = MAX_IMAGES_PER_REQUEST):
    """Start the server (returns it; call .wait_for_termination() to block)."""
    service = GeneratorService(checkpoint, cache_dir, max_images=max_images)
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
