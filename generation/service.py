"""The generation service: gRPC `Generate` streams uint8 image batches with their labels,
with gRPC health checking, a content-addressed cache on disk, and limits on what one
request may ask.

The cache key is a hash of the checkpoint's weights (the UNet's tensors as loaded, and the
noise schedule) and the request (counts, seed, steps, guidance, sampler), so the same
request is computed once, ever, and a new checkpoint never serves stale images. Sampling holds one lock: concurrent requests queue, none fails for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import generation_pb2, generation_pb2_grpc
from .model import load_generator, weights_digest
from .sample import sample

LOG = logging.getLogger("fedfill.generation")
SERVICE_NAME = "fedfill.generation.Generator"
MAX_IMAGES_PER_REQUEST = 20_000
STREAM_BATCH = 256


class GeneratorService(generation_pb2_grpc.GeneratorServicer):
    def __init__(self, checkpoint: str | Path, cache_dir: str | Path, sampler: str = "ddim",
                 max_images: int = MAX_IMAGES_PER_REQUEST):
        self.config, self.pipe = load_generator(checkpoint)
        self.checkpoint_digest = weights_digest(self.pipe)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.sampler, self.max_images = sampler, max_images
        self.lock = threading.Lock()
        self.computed = self.cache_hits = 0

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
        if not 1 <= request.steps <= 1000:
            return f"steps must be in 1..1000, got {request.steps}"
        if not (np.isfinite(request.guidance) and 0.0 <= request.guidance <= 20.0):
            return f"guidance must be in [0, 20], got {request.guidance}"
        return None

    def cache_key(self, request) -> str:
        key = {"checkpoint": self.checkpoint_digest, "counts": list(request.class_counts), "seed": request.seed,
               "steps": request.steps, "guidance": round(float(request.guidance), 6), "sampler": self.sampler}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def images_for(self, request) -> tuple[np.ndarray, np.ndarray, bool]:
        path = self.cache_dir / f"{self.cache_key(request)}.npz"
        with self.lock:
            if path.exists():
                with np.load(path) as cached:
                    self.cache_hits += 1
                    return cached["images"], cached["labels"], True
            labels = np.repeat(np.arange(self.config.num_classes), list(request.class_counts))
            images = sample(self.config, self.pipe, labels, steps=request.steps, guidance=request.guidance,
                            seed=request.seed, sampler=self.sampler)
            buffer = io.BytesIO()
            np.savez(buffer, images=images, labels=labels)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)  # readers never see half a file
            self.computed += 1
            return images, labels, False

    def Generate(self, request, context):
        problem = self.check(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        images, labels, cached = self.images_for(request)
        LOG.info("served %d images (%s)", len(labels), "cache" if cached else "computed")
        n, h, w, c = images.shape if len(images) else (0, self.config.image_size, self.config.image_size, self.config.channels)
        for start in range(0, max(n, 1), STREAM_BATCH):
            chunk = images[start:start + STREAM_BATCH]
            yield generation_pb2.ImageBatch(images=chunk.tobytes(), labels=labels[start:start + STREAM_BATCH].tolist(),
                                            height=h, width=w, channels=c, from_cache=cached)


def serve(checkpoint: str | Path, port: int, cache_dir: str | Path, host: str = "127.0.0.1", workers: int = 8):
    """Start the server (returns it; call .wait_for_termination() to block)."""
    service = GeneratorService(checkpoint, cache_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    generation_pb2_grpc.add_GeneratorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, service
