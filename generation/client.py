"""The client the ClientApp uses: one call, a timeout, retries on an unreachable service,
and one exception type for "no synthetic data this time" (the caller then trains on local
data and says so).

`fetch` asks for a delivery mode [MEG] and returns what came (`Delivered`), with the bytes it
took on the wire; generation.delivery.finish turns it into images on the device. `generate`
is the image mode's shortcut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from . import generation_pb2, generation_pb2_grpc

# gRPC's length prefix before every message (HTTP/2's own frames are not counted)
GRPC_MESSAGE_PREFIX = 5
# not DEADLINE_EXCEEDED: the service stops an expired call and caches none of it, so a retry
# starts from nothing under the same deadline (seen on a busy testbed at 28x28: three 120 s
# tries a round, every one expired, no sample delivered)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class GenerationUnavailable(RuntimeError):
    """The service could not deliver (down, too slow, or it refused the request)."""


def serving(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the service at `address` answers gRPC's standard health check with SERVING
    (what a supervisor, a container health check or a test waits for)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class DeliveredBatch:
    """One ImageBatch of a reply, decoded: the service's batches are the sampler's, and a
    device completes each with that batch's own noise stream and hand-off noise."""

    first_index: int  # of its first image in the request
    labels: np.ndarray  # int64 [n]
    images: np.ndarray | None = None  # uint8 [n, h, w, c]: images, or a SKETCH's sketches
    states: np.ndarray | None = None  # float32 [n, c, h, w]: a STATE's decoded states
    noise_var: float = 0.0  # STATE: per-element variance the codec added


@dataclass
class Delivered:
    """What the service sent for one request, decoded."""

    delivery: str  # image, sketch, state or seed
    batches: list[DeliveredBatch] = field(default_factory=list)
    checkpoint_digest: str = ""
    sampler: str = ""
    resume_index: int = 0  # STATE, SKETCH: the sampler step the device resumes at
    timestep: int = 0  # STATE: the training timestep of the states
    downlink_bytes: int = 0  # the reply's messages as serialized, with gRPC's prefix of each
    server_unet_evals: int = 0
    server_seconds: float = 0.0

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([b.labels for b in self.batches]) if self.batches else np.zeros(0, np.int64)

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([b.images for b in self.batches])


class GenerationClient:
    def __init__(self, address: str, timeout_s: float = 120.0, retries: int = 2, backoff_s: float = 1.0):
        self.address, self.timeout_s, self.retries, self.backoff_s = address, timeout_s, retries, backoff_s

    def generate(self, class_counts, seed: int = 0, steps: int = 20, guidance: float = 2.0):
        """(images uint8 [N, H, W, C], labels int64 [N]) for the requested counts per class."""
        delivered = self.fetch(class_counts, seed, steps, guidance)
        return delivered.images, delivered.labels

    def fetch(self, class_counts, seed: int = 0, steps: int = 20, guidance: float = 2.0, *, delivery: str = "image",
              server_steps: int = 0, state_bits: int = 32, sketch_factor: int = 2) -> Delivered:
        """What the service sends for the counts per class in the given delivery mode
        (generation.delivery.finish makes the images of it). server_steps: for state and
        sketch, the sampler step the device resumes at; state_bits: the codec's width of a
        state; sketch_factor: a sketch's downsampling per side."""
        request = generation_pb2.GenerateRequest(
            class_counts=[int(c) for c in class_counts], seed=int(seed), steps=int(steps), guidance=float(guidance),
            delivery=generation_pb2.Delivery.Value(delivery.upper()), server_steps=int(server_steps),
            state_bits=int(state_bits), sketch_factor=int(sketch_factor))
        for attempt in range(self.retries + 1):
            try:
                with grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length",
                                                                  64 * 1024 * 1024)]) as channel:
                    stub = generation_pb2_grpc.GeneratorStub(channel)
                    return decode_reply(stub.Generate(request, timeout=self.timeout_s), delivery)
            except grpc.RpcError as err:
                code = err.code()
                if code not in RETRYABLE or attempt == self.retries:
                    raise GenerationUnavailable(f"{self.address}: {code.name}: {err.details()}") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise GenerationUnavailable(f"{self.address}: no answer")  # not reached


class MalformedReply(GenerationUnavailable):
    """The service's reply cannot be used: a truncated or corrupted state, NaN in it, sizes
    that do not add up. Its images are dropped, never kept wrong."""


def decode_reply(batches, delivery: str) -> Delivered:
    from fedfill.codec import decode

    delivered = Delivered(delivery=delivery)
    first = 0
    for k, batch in enumerate(batches):
        delivered.downlink_bytes += batch.ByteSize() + GRPC_MESSAGE_PREFIX
        if k == 0:
            delivered.checkpoint_digest, delivered.sampler = batch.checkpoint_digest, batch.sampler
            delivered.resume_index, delivered.timestep = batch.resume_index, batch.timestep
            delivered.server_unet_evals, delivered.server_seconds = batch.server_unet_evals, batch.server_seconds
        labels = np.asarray(batch.labels, dtype=np.int64)
        n = len(labels)
        part = DeliveredBatch(first_index=first, labels=labels)
        shape = (n, batch.height, batch.width, batch.channels)
        if delivery == "state":
            try:
                (states,) = decode(batch.state, expected_shapes=[(n, batch.channels, batch.height, batch.width)])
            except ValueError as err:
                raise MalformedReply(f"a state payload of {len(batch.state)} bytes cannot be decoded: {err}") from None
            if not np.isfinite(states).all() or not (np.isfinite(batch.noise_var) and batch.noise_var >= 0):
                raise MalformedReply("a state holds NaN or infinite values, or an invalid noise variance")
            part.states, part.noise_var = states.astype(np.float32, copy=False), float(batch.noise_var)
        elif delivery in ("image", "sketch"):
            if len(batch.images) != int(np.prod(shape)):
                raise MalformedReply(f"{len(batch.images)} image bytes for {n} images of "
                                     f"{batch.height}x{batch.width}x{batch.channels}")
            part.images = np.frombuffer(batch.images, np.uint8).reshape(shape)
        delivered.batches.append(part)
        first += n
    return delivered
