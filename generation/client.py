"""The client the ClientApp uses: one call, a timeout, retries on an unreachable service,
and one exception type for "no synthetic data this time" (the caller then trains on local
data and says so)."""

from __future__ import annotations

import time

import grpc
import numpy as np

from . import generation_pb2, generation_pb2_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


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


class GenerationClient:
    def __init__(self, address: str, timeout_s: float = 120.0, retries: int = 2, backoff_s: float = 1.0):
        self.address, self.timeout_s, self.retries, self.backoff_s = address, timeout_s, retries, backoff_s

    def generate(self, class_counts, seed: int = 0, steps: int = 20, guidance: float = 2.0):
        """(images uint8 [N, H, W, C], labels int64 [N]) for the requested counts per class."""
        request = generation_pb2.GenerateRequest(class_counts=[int(c) for c in class_counts], seed=int(seed),
                                                 steps=int(steps), guidance=float(guidance))
        for attempt in range(self.retries + 1):
            try:
                with grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length",
                                                                  64 * 1024 * 1024)]) as channel:
                    stub = generation_pb2_grpc.GeneratorStub(channel)
                    images, labels = [], []
                    for batch in stub.Generate(request, timeout=self.timeout_s):
                        n = len(batch.labels)
                        images.append(np.frombuffer(batch.images, np.uint8).reshape(n, batch.height, batch.width,
                                                                                      batch.channels))
                        labels.extend(batch.labels)
                    return np.concatenate(images), np.asarray(labels, dtype=np.int64)
            except grpc.RpcError as err:
                code = err.code()
                if code not in RETRYABLE or attempt == self.retries:
                    raise GenerationUnavailable(f"{self.address}: {code.name}: {err.details()}") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise GenerationUnavailable(f"{self.address}: no answer")  # not reached
