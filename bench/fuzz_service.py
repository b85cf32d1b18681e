"""Hostile Generate requests against the generation service over real gRPC.

    python bench/fuzz_service.py --cases 10000 [--seed 0]     # a few minutes on 2 cores

Starts the service in a process of its own (so a crash shows as a dead process and its memory
can be read), throws `cases` seeded hostile requests at it through one real channel, as raw
bytes through a generic method so that the bytes need not be a valid GenerateRequest, and
prints what came back: how many were tried, rejected (by status code), accepted, crashed,
hung, and the worst latency. Zero crashes, zero hangs, zero server errors is the bar.

The hostile requests: wrong class counts (none, too few, thousands), negative and huge counts
(up to int64's largest in every class), a total one over the image limit and exactly at it,
steps and guidance out of range (0, negatives, NaN, infinities, huge), seeds out of range,
random bytes, valid requests bit-flipped, truncated or grown, unknown fields, and messages of
exactly the byte limit and one byte over. Valid ones are kept cheap (one image at one step,
from a few seeds, so most are cache hits) and the service runs with a small image limit
(FUZZ_MAX_IMAGES) so that a request at the limit is cheap too; the checks are the same as at
the default limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generation import generation_pb2  # noqa: E402
from generation.config import DEFAULT_CHECKPOINT  # noqa: E402
from generation.service import (MAX_IMAGES_PER_REQUEST, MAX_REQUEST_BYTES, MAX_SEED, SERVICE_NAME,  # noqa: E402
                                SLICE_IMAGES)

GENERATE = f"/{SERVICE_NAME}/Generate"
FUZZ_MAX_IMAGES = 16
CALL_TIMEOUT_S = 60.0
REJECTIONS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
INT64_MAX, INT64_MIN, INT32_MAX, INT32_MIN = 2 ** 63 - 1, -2 ** 63, 2 ** 31 - 1, -2 ** 31

# The child: serve, then say on stdout where and what (one JSON line), then block.
_CHILD = """
import json, sys
from generation.service import serve
server, port, service = serve(sys.argv[1], 0, sys.argv[2], max_images=int(sys.argv[3]), slice_images=int(sys.argv[4]))
config = service.config
print(json.dumps({"port": port, "num_classes": config.num_classes, "max_images": service.max_images,
                  "image_shape": [config.image_size, config.image_size, config.channels]}), flush=True)
server.wait_for_termination()
"""


class ServiceProcess:
    """The generation service (generation.service.serve) in a process of its own on loopback.

    Use as a context manager; `address`, `num_classes`, `max_images`, `image_shape` come from
    the child once it serves. `stop()` ends it, `kill()` kills it (SIGKILL, as a crash would).
    """

    def __init__(self, cache_dir: str | Path, max_images: int = MAX_IMAGES_PER_REQUEST,
                 checkpoint: str | Path = DEFAULT_CHECKPOINT, start_timeout_s: float = 300.0,
                 slice_images: int = SLICE_IMAGES):
        self.cache_dir = Path(cache_dir)
        self.log = tempfile.TemporaryFile("w+")  # the child's stderr, read back when it fails
        command = [sys.executable, "-c", _CHILD, str(checkpoint), str(cache_dir), str(max_images), str(slice_images)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            info = json.loads(self._first_line(start_timeout_s))
        except BaseException:
            self.kill()
            raise
        self.port, self.num_classes, self.max_images = info["port"], info["num_classes"], info["max_images"]
        self.image_shape = tuple(info["image_shape"])
        self.address = f"127.0.0.1:{self.port}"

    def _first_line(self, timeout_s: float) -> str:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                raise TimeoutError(f"the service did not start in {timeout_s:.0f} s: {self.stderr_tail()}")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the service exited with {self.process.wait()}: {self.stderr_tail()}")
        return line

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        """The service process's resident memory now (Linux: VmRSS in /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def serving(self) -> bool:
        from generation.client import serving

        return self.alive() and serving(self.address, timeout_s=10.0)

    def stderr_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGINT)  # wait_for_termination ends on it
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()
        self.log.close()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------- the hostile requests

def request_bytes(counts, steps: int = 1, guidance: float = 1.0, seed: int = 0, **delivery) -> bytes:
    """delivery: the split-generation fields (delivery, server_steps, state_bits, sketch_factor)."""
    return generation_pb2.GenerateRequest(class_counts=counts, steps=steps, guidance=guidance, seed=seed,
                                          **delivery).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unknown_field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    """One field the GenerateRequest does not have, in protobuf's wire format."""
    key = _varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + _varint(payload)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload  # 1 (8 bytes) or 5 (4 bytes)


def padded_to(data: bytes, size: int) -> bytes:
    """`data` with one unknown bytes field (number 15) appended so that it is `size` bytes long."""
    for payload in range(max(0, size - len(data) - 6), size):
        padded = data + unknown_field(15, 2, b"\0" * payload)
        if len(padded) == size:
            return padded
    raise ValueError(f"cannot pad {len(data)} bytes to {size}")


class Case:
    """One request: its kind, its bytes, and what it must get ("accept", "reject" or "either"
    for bytes that may happen to parse); for an accepted one, how many images."""

    def __init__(self, kind: str, data: bytes, expect: str, images: int | None = None):
        self.kind, self.data, self.expect, self.images = kind, data, expect, images


def hostile_case(rng: np.random.Generator, num_classes: int, max_images: int) -> Case:
    """One seeded request, mostly hostile; cheap to serve when valid."""
    c = num_classes

    def tiny(**changes):  # a valid one-image request, cached after its first time
        counts = [0] * c
        counts[int(rng.integers(c))] = 1
        fields = {"counts": counts, "steps": 1, "guidance": float(rng.choice([0.0, 1.0, 2.0])),
                  "seed": int(rng.integers(4))}
        fields.update(changes)
        return fields

    kind = str(rng.choice(KINDS, p=WEIGHTS))
    if kind == "valid":
        fields = tiny()
        return Case(kind, request_bytes(**fields), "accept", sum(fields["counts"]))
    if kind == "no images":
        return Case(kind, request_bytes([0] * c, seed=int(rng.integers(4))), "accept", 0)
    if kind == "class count":
        length = int(rng.choice([0, 1, c - 1, c + 1, 2 * c, int(rng.integers(c + 2, 5000))]))
        return Case(kind, request_bytes(**{**tiny(), "counts": [1] * length}), "reject")
    if kind == "negative count":
        counts = tiny()["counts"]
        counts[int(rng.integers(c))] = int(rng.choice([-1, -2, INT64_MIN, -int(rng.integers(1, 2 ** 62))]))
        return Case(kind, request_bytes(**{**tiny(), "counts": counts}), "reject")
    if kind == "too many images":
        choice = int(rng.integers(4))
        if choice == 0:  # one over the limit
            counts = list(np.random.default_rng(rng.integers(2 ** 32)).multinomial(max_images + 1, [1 / c] * c))
        elif choice == 1:  # 10^9 in all
            counts = [10 ** 9 // c] * c
            counts[0] += 10 ** 9 - sum(counts)
        elif choice == 2:  # the largest int64 in every class: the sum overflows 64 bits
            counts = [INT64_MAX] * c
        else:
            counts = [int(x) for x in rng.integers(max_images, 2 ** 40, size=c)]
        return Case(kind, request_bytes(**{**tiny(), "counts": [int(x) for x in counts]}), "reject")
    if kind == "at the limit":  # exactly max_images: served
        counts = [int(x) for x in np.random.default_rng(int(rng.integers(2))).multinomial(max_images, [1 / c] * c)]
        return Case(kind, request_bytes(counts, seed=0), "accept", max_images)
    if kind == "steps":
        steps = int(rng.choice([0, -1, INT32_MIN, 1001, INT32_MAX, int(rng.integers(1001, INT32_MAX))]))
        return Case(kind, request_bytes(**{**tiny(), "steps": steps}), "reject")
    if kind == "guidance":
        guidance = float(rng.choice([math.nan, math.inf, -math.inf, -1e-3, -1.0, 20.5, 1e38, -1e38, 3.4e38]))
        return Case(kind, request_bytes(**{**tiny(), "guidance": guidance}), "reject")
    if kind == "seed":
        seed = int(rng.choice([-1, INT64_MIN, INT64_MAX, MAX_SEED + 1, int(rng.integers(MAX_SEED + 1, INT64_MAX))]))
        return Case(kind, request_bytes(**{**tiny(), "seed": seed}), "reject")
    if kind == "split":  # a valid hand-off of one image: sampled for 1 step of 2 (STATE) or 2 (SKETCH), or none (SEED)
        delivery = int(rng.choice([generation_pb2.STATE, generation_pb2.SKETCH, generation_pb2.SEED]))
        fields = {**tiny(), "steps": 2, "delivery": delivery, "server_steps": 1,
                  "state_bits": int(rng.choice([2, 8, 32])), "sketch_factor": int(rng.choice([2, 4, 8]))}
        return Case(kind, request_bytes(**fields), "accept", 1)
    if kind == "delivery":  # a hand-off the service cannot make
        fields = {**tiny(), "steps": int(rng.integers(2, 30))}
        how = int(rng.integers(5))
        if how == 0:
            fields["delivery"] = int(rng.choice([4, 5, -1, INT32_MIN, INT32_MAX]))
        elif how in (1, 2):
            fields["delivery"] = int(rng.choice([generation_pb2.STATE, generation_pb2.SKETCH]))
            fields["server_steps"] = int(rng.choice([0, -1, fields["steps"], fields["steps"] + 1, INT32_MAX, INT32_MIN]))
            fields["state_bits"], fields["sketch_factor"] = 8, 2
        elif how == 3:
            fields.update(delivery=generation_pb2.STATE, server_steps=1,
                          state_bits=int(rng.choice([0, 1, 33, 64, -8, INT32_MAX, INT32_MIN])))
        else:
            fields.update(delivery=generation_pb2.SKETCH, server_steps=1,
                          sketch_factor=int(rng.choice([0, 1, 3, 5, 7, 9, 16, -2, INT32_MAX, INT32_MIN])))
        return Case(kind, request_bytes(**fields), "reject")
    if kind == "random bytes":
        return Case(kind, rng.bytes(int(rng.integers(0, 300))), "either")
    if kind == "mutated":
        data = bytearray(request_bytes(**tiny()))
        how = int(rng.integers(3))
        if how == 0:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        elif how == 1:
            data = data[:int(rng.integers(len(data)))]
        else:
            at = int(rng.integers(len(data) + 1))
            data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        return Case(kind, bytes(data), "either")
    if kind == "unknown fields":
        fields = tiny()
        # numbers past the request's own fields (1-8)
        extra = b"".join(unknown_field(int(rng.integers(9, 2 ** 29)), wire, payload) for wire, payload in
                         [(0, int(rng.integers(2 ** 63))), (1, rng.bytes(8)), (2, rng.bytes(int(rng.integers(50)))),
                          (5, rng.bytes(4))][:int(rng.integers(1, 5))])
        return Case(kind, request_bytes(**fields) + extra, "accept", 1)
    if kind == "byte limit":
        fields = tiny()
        over = int(rng.choice([0, 0, 1, 1, 2, MAX_REQUEST_BYTES]))
        data = padded_to(request_bytes(**fields), MAX_REQUEST_BYTES + over)
        return Case(kind, data, "accept" if over == 0 else "reject", 1 if over == 0 else None)
    raise AssertionError(kind)


KINDS, WEIGHTS = zip(*{
    "valid": 8, "no images": 1, "at the limit": 1, "unknown fields": 4, "class count": 8, "negative count": 8,
    "too many images": 8, "steps": 8, "guidance": 8, "seed": 6, "random bytes": 16, "mutated": 16,
    "byte limit": 2, "split": 4, "delivery": 8,
}.items())
WEIGHTS = tuple(w / sum(WEIGHTS) for w in WEIGHTS)


# ---------------------------------------------------------------- throwing them

def call_raw(channel: grpc.Channel, data: bytes, timeout_s: float = CALL_TIMEOUT_S) -> list[generation_pb2.ImageBatch]:
    """Generate with `data` sent as it is (no serializer): the stream's batches, or grpc.RpcError."""
    generate = channel.unary_stream(GENERATE, request_serializer=None,
                                    response_deserializer=generation_pb2.ImageBatch.FromString)
    return list(generate(data, timeout=timeout_s))


def images_in(batches, image_shape) -> int:
    """How many images a stream carries; ValueError where its bytes and labels disagree (for
    a hand-off: a STATE without its payload, a SEED with pixels, a SKETCH not smaller)."""
    total = 0
    for batch in batches:
        shape = (batch.height, batch.width, batch.channels)
        n = len(batch.labels)
        if batch.delivery == generation_pb2.STATE:
            wrong = shape != tuple(image_shape) or not batch.state or batch.images
        elif batch.delivery == generation_pb2.SEED:
            wrong = shape != tuple(image_shape) or batch.images or batch.state
        elif batch.delivery == generation_pb2.SKETCH:
            wrong = batch.height >= image_shape[0] or len(batch.images) != n * math.prod(shape)
        else:
            wrong = shape != tuple(image_shape) or len(batch.images) != n * math.prod(shape)
        if wrong:
            raise ValueError(f"a {generation_pb2.Delivery.Name(batch.delivery)} batch of {n} labels, "
                             f"{len(batch.images)} image bytes, {len(batch.state)} state bytes, shape {shape}")
        total += n
    return total


def fuzz_generate(cases: int, seed: int, *, service: ServiceProcess | None = None) -> dict:
    """Throw `cases` seeded hostile requests at a generation service (a fresh one with
    FUZZ_MAX_IMAGES, or `service`: give it a small max_images too, as requests at its limit
    are sampled) and count what came back.

    Returns tried, accepted, rejected (by status code name), crashes (a non-gRPC error, a
    dead server or one that no longer answers: the run stops at the first), hangs (deadline
    exceeded), server_errors (any other status, e.g. INTERNAL), wrong (a case answered
    against its expectation, or a stream whose images do not match the request), examples
    (the first few of each bad sort), worst_latency_s, seconds, serving_after, the service's
    rss_mb_before/after, and by_kind (tried per kind of request).
    """
    own = service is None
    if own:
        scratch = tempfile.TemporaryDirectory(prefix="fuzz-service-")
        service = ServiceProcess(scratch.name, max_images=FUZZ_MAX_IMAGES)
    rng = np.random.default_rng(seed)
    result = {"tried": 0, "accepted": 0, "rejected": {}, "crashes": 0, "hangs": 0, "server_errors": 0, "wrong": 0,
              "examples": [], "worst_latency_s": 0.0, "by_kind": {}}

    def bad(sort: str, case: Case, detail: str):
        result[sort] += 1
        if len(result["examples"]) < 20:
            result["examples"].append(f"{sort}: {case.kind} ({len(case.data)} bytes): {detail}")

    started = time.monotonic()
    try:
        result["rss_mb_before"] = service.rss_bytes() / 2 ** 20
        with grpc.insecure_channel(service.address) as channel:
            for _ in range(cases):
                case = hostile_case(rng, service.num_classes, service.max_images)
                result["tried"] += 1
                result["by_kind"][case.kind] = result["by_kind"].get(case.kind, 0) + 1
                sent = time.monotonic()
                try:
                    got = images_in(call_raw(channel, case.data), service.image_shape)
                except grpc.RpcError as err:
                    code = err.code()
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        bad("hangs", case, err.details())
                    elif code in REJECTIONS and err.details():
                        result["rejected"][code.name] = result["rejected"].get(code.name, 0) + 1
                        if case.expect == "accept":
                            bad("wrong", case, f"rejected: {err.details()}")
                    elif not service.alive() or code == grpc.StatusCode.UNAVAILABLE:
                        bad("crashes", case, f"{code.name}: {err.details()}; alive: {service.alive()}")
                        break
                    else:
                        bad("server_errors", case, f"{code.name}: {err.details()}")
                except Exception as err:  # noqa: BLE001 - counted as a crash, which the caller asserts on
                    bad("crashes", case, f"{type(err).__name__}: {err}")
                    break
                else:
                    result["accepted"] += 1
                    if case.expect == "reject" or (case.images is not None and got != case.images):
                        bad("wrong", case, f"accepted with {got} images")
                result["worst_latency_s"] = max(result["worst_latency_s"], time.monotonic() - sent)
        result["serving_after"] = service.serving()
        result["rss_mb_after"] = service.rss_bytes() / 2 ** 20 if service.alive() else None
    finally:
        result["seconds"] = time.monotonic() - started
        if own:
            service.stop()
            scratch.cleanup()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"Generate over gRPC: {args.cases} hostile requests, seed {args.seed} "
          f"(image limit {FUZZ_MAX_IMAGES}, byte limit {MAX_REQUEST_BYTES})", flush=True)
    result = fuzz_generate(args.cases, args.seed)
    rejected = ", ".join(f"{name} {n}" for name, n in sorted(result["rejected"].items()))
    print(f"tried {result['tried']}  accepted {result['accepted']}  rejected {sum(result['rejected'].values())} "
          f"({rejected})")
    print(f"crashes {result['crashes']}  hangs {result['hangs']}  server errors {result['server_errors']}  "
          f"wrong {result['wrong']}  serving after: {result['serving_after']}")
    print(f"worst latency {result['worst_latency_s']:.3f} s  total {result['seconds']:.1f} s  "
          f"service RSS {result['rss_mb_before']:.0f} -> {result['rss_mb_after'] or 0:.0f} MiB")
    print("by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(result["by_kind"].items())))
    for example in result["examples"]:
        print("  " + example)
    clean = not (result["crashes"] or result["hangs"] or result["server_errors"] or result["wrong"])
    return 0 if clean and result["serving_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
