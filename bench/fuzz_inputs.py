"""Hostile inputs for every parser of untrusted bytes (issue 13, item 1): at least --cases
per entry point, from a fixed seed, through the real functions.

    python bench/fuzz_inputs.py [--cases 10000] [--seed 0] [--only NAME ...] [--time-limit 10]

Why: the server reads bytes from every device (the codec payload, the reply's records, the
device profile), an operator's files (a scenario, a run's checkpoint, a generator
checkpoint), and the generation service reads every device's requests (`generate`: over real
gRPC, bench/fuzz_service.py's hostile requests; a refusal there is a status with a reason);
one malformed input that crashes the ServerApp loses a round for everyone.

Per entry point it prints: cases tried, refused (a clear reason: the entry point's own error
type with a message, counted per reason class), accepted, crashes (anything else: IndexError,
struct.error, MemoryError, a numpy RuntimeWarning, an accepted input the next step chokes
on, ...), hangs (a case over --time-limit seconds), the worst per-case time, and the peak
memory one input made Python and numpy allocate (tracemalloc, measured on the hand-written
cases and every --memory-every-th case; torch's allocations are not traced) with its ratio to
the input's size. Crashes and hangs must be 0; the exit status is 1 otherwise.

The inputs: a few valid seeds per entry point, mutated by seeded numpy Generators (bit flips,
truncations, appended bytes, splices, header fields overwritten with extreme values and the
CRC fixed up so the mutation reaches the parser behind it, JSON values swapped for hostile
ones, files deleted), plus hand-written nasty cases first (a header claiming 10**12
elements, an int64-wrapping shape, deep JSON nesting, a zip bomb, ...). The same seed gives
the same counts.

Adding an entry point: write
`def my_fuzz(rng: np.random.Generator, cases: int) -> Fuzz` returning the inputs (at least
`cases`, an iterable), the target (one input -> the real entry point; returns when accepted,
raises when it refuses) and the refusal types, and add it to ENTRY_POINTS under its name.
Setup that is slow (a server, a model) belongs in that function, and `Fuzz.close` releases it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import re
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfill import codec  # noqa: E402

MEMORY_BOUND_BYTES = 64 * 2**20  # what one hostile input may make the parser allocate, beyond...
MEMORY_BOUND_RATIO = 300  # ...this many times its own size (a 2-bit payload unpacks to 64-bit words)


@dataclass
class Fuzz:
    """One entry point's hostile inputs and how to feed them."""

    inputs: Iterable
    target: Callable[[object], object]
    refusals: tuple[type[BaseException], ...]
    size: Callable[[object], int] = lambda item: len(item) if isinstance(item, (bytes, str)) else 0
    close: Callable[[], None] = lambda: None
    hand_written: int = 0  # the first inputs: hand-written nasty cases (their memory is always traced)
    scrub: str = ""  # a temporary path that refusal messages name: left out of the reason classes


class AcceptedButUnusable(Exception):
    """An input the entry point accepted and the next step of the real code cannot use: a crash."""


class Hang(Exception):
    pass


@dataclass
class Result:
    name: str
    tried: int = 0
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: int = 0
    worst_s: float = 0.0
    peak_bytes: int = 0  # the most one traced input made Python and numpy allocate...
    peak_input_bytes: int = 0  # ...and that input's size
    seconds: float = 0.0

    @property
    def memory_bounded(self) -> bool:
        return self.peak_bytes <= MEMORY_BOUND_BYTES + MEMORY_BOUND_RATIO * self.peak_input_bytes

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.hangs and self.tried > 0 and self.memory_bounded


# ---------------------------------------------------------------------------- running

def reason_class(err: BaseException, scrub: str = "") -> str:
    """The kind of a refusal: its type and message with the particulars (numbers, quoted
    values, shapes, paths) taken out, so that counts group by reason."""
    text = str(err).replace(scrub, "DIR") if scrub else str(err)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", "(…)", text)
    text = re.sub(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf", "#", text)
    return f"{type(err).__name__}: {text[:70]}"


def _alarm(signum, frame):
    raise Hang()


def run_entry(name: str, fuzz: Fuzz, cases: int, time_limit_s: float = 10.0, memory_every: int = 50) -> Result:
    """Feed `cases` inputs (at least) to the target, one at a time, and classify each."""
    result = Result(name)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for index, item in enumerate(fuzz.inputs):
            if index >= cases:
                break
            traced = index < fuzz.hand_written or index % memory_every == 0
            if traced:
                tracemalloc.start()
            began = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, time_limit_s)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow/invalid: a crash here
                    fuzz.target(item)
                outcome = None
            except Hang:
                outcome = "hang"
            except fuzz.refusals as err:
                outcome = err if str(err).strip() else RuntimeError(f"{type(err).__name__} with no message")
            except BaseException as err:  # noqa: BLE001 - anything else is what we look for
                if isinstance(err, KeyboardInterrupt):
                    raise
                outcome = RuntimeError(f"{type(err).__name__}: {str(err)[:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - began
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                if peak > result.peak_bytes:
                    result.peak_bytes, result.peak_input_bytes = peak, fuzz.size(item)
            result.tried += 1
            result.worst_s = max(result.worst_s, elapsed)
            if outcome == "hang" or elapsed > time_limit_s:
                result.hangs += 1
            elif outcome is None:
                result.accepted += 1
            elif isinstance(outcome, fuzz.refusals):
                result.refused[reason_class(outcome, fuzz.scrub)] += 1
            else:
                result.crashes.append(f"case {index}: {outcome}")
    finally:
        signal.signal(signal.SIGALRM, previous)
        fuzz.close()
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- mutators

def flip_bits(data: bytes, rng: np.random.Generator, at_least: int = 0) -> bytes:
    if len(data) <= at_least:
        return data
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(at_least, len(out)))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[:int(rng.integers(0, max(len(data), 1)))]


def append_noise(data: bytes, rng: np.random.Generator) -> bytes:
    return data + rng.bytes(int(rng.integers(1, 64)))


def overwrite(data: bytes, rng: np.random.Generator, offset: int, fmt: str, value) -> bytes:
    """Write struct `fmt` at `offset` (the input grows with zeros when too short)."""
    out = bytearray(data)
    size = struct.calcsize(fmt)
    if len(out) < offset + size:
        out.extend(bytes(offset + size - len(out)))
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def random_bytes(rng: np.random.Generator, longest: int = 256) -> bytes:
    return rng.bytes(int(rng.integers(0, longest)))


# ---------------------------------------------------------------------------- codec.decode

def _seed_payloads(rng: np.random.Generator) -> list[tuple[bytes, list[tuple[int, ...]]]]:
    seeds = []
    for bits in (2, 3, 4, 5, 7, 8, 9, 12, 16, 24, 31, 32):
        tensors = [rng.normal(0, 1, size=(3, 4)).astype(np.float32), rng.normal(0, 1, size=5).astype(np.float64),
                   rng.normal(0, 1, size=(2, 1, 2)).astype(np.float16), np.zeros(0, np.float32)]
        tensors = tensors[:int(rng.integers(1, 5))]
        seeds.append((codec.encode(tensors, bits, rng), [t.shape for t in tensors]))
    return seeds


def fix_crc(payload: bytes) -> bytes:
    """The CRC game: a mutated payload with a valid checksum reaches the parser behind it."""
    if len(payload) < codec.PAYLOAD_HEADER_BYTES:
        return payload
    return payload[:12] + struct.pack("<I", zlib.crc32(payload[16:])) + payload[16:]


def _header(dtype=0, bits=8, ndim=1, dims=(1, 0, 0, 0, 0, 0), lo=0.0, hi=1.0, count=1, body=b"") -> bytes:
    """A payload of one crafted tensor header (and `body`), with a valid CRC."""
    tensor = struct.pack("<BBB1x6Iff", dtype, bits, ndim, *dims, lo, hi) + body
    return struct.pack("<4sB3xII", codec.MAGIC, codec.VERSION, count, zlib.crc32(tensor)) + tensor


CODEC_NASTY = [
    (_header(ndim=2, dims=(10**6, 10**6, 0, 0, 0, 0)), None),  # 10**12 elements, no data
    (_header(ndim=6, dims=(2**32 - 1,) * 6), None),  # the product wraps int64
    (_header(bits=2, ndim=3, dims=(2**31, 2**31, 4, 0, 0, 0)), None),  # wraps to exactly 0
    (_header(ndim=6, dims=(0,) + (2**32 - 1,) * 5), None),  # empty, but beyond numpy's size
    (_header(dtype=2, hi=1e30, body=b"\x7f"), None),  # float16 levels beyond its range
    (_header(dtype=2, bits=32, lo=0.0, hi=0.0, body=struct.pack(">f", 1e30)), None),
    (_header(bits=32, lo=0.0, hi=0.0, body=b"\x7f\xc0\x00\x00"), None),  # NaN
    (_header(count=2**32 - 1), None),
    (_header(lo=float("nan")), None), (_header(lo=2.0, hi=1.0), None), (_header(bits=1), None),
    (_header(bits=33), None), (_header(ndim=7), None), (_header(dtype=9), None),
    (b"", None), (b"FFQC", None), (codec.MAGIC + bytes(12), None),
    ("a string", None), (None, None), ([1, 2, 3], None), (np.arange(8, dtype=np.int32), None),
]


def codec_inputs(rng: np.random.Generator) -> Iterator[tuple[object, list | None]]:
    yield from CODEC_NASTY
    seeds = _seed_payloads(rng)
    extremes = [0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
    float_extremes = [0.0, -1.0, 1e-45, 3.4e38, float("inf"), float("-inf"), float("nan"), 65504.0, 1e5]
    while True:
        payload, shapes = seeds[int(rng.integers(len(seeds)))]
        expected = shapes if rng.random() < 0.3 else None
        kind = int(rng.integers(9))
        if kind == 0:
            out = flip_bits(payload, rng)
        elif kind == 1:
            out = fix_crc(flip_bits(payload, rng, at_least=4))
        elif kind == 2:
            out = truncate(payload, rng)
            out = fix_crc(out) if rng.random() < 0.7 else out
        elif kind == 3:
            out = fix_crc(append_noise(payload, rng))
        elif kind in (4, 5):  # a header field of the first (or a random) tensor set to an extreme
            base = 16 if rng.random() < 0.7 else int(rng.integers(16, max(len(payload) - 36, 17)))
            slot = int(rng.integers(11))
            if slot < 3:
                out = overwrite(payload, rng, base + slot, "<B", int(rng.choice([0, 1, 2, 3, 6, 7, 31, 32, 33, 255])))
            elif slot < 9:
                out = overwrite(payload, rng, base + 4 + 4 * (slot - 3), "<I", int(rng.choice(extremes)))
            else:
                out = overwrite(payload, rng, base + 28 + 4 * (slot - 9), "<f", float(rng.choice(float_extremes)))
            out = fix_crc(out)
        elif kind == 6:  # the payload header: count, version
            out = fix_crc(overwrite(payload, rng, 8, "<I", int(rng.choice(extremes))) if rng.random() < 0.8
                          else overwrite(payload, rng, 4, "<B", int(rng.integers(256))))
        elif kind == 7:
            other = seeds[int(rng.integers(len(seeds)))][0]
            cut = int(rng.integers(16, len(payload) + 1))
            out = fix_crc(payload[:cut] + other[int(rng.integers(16, len(other) + 1)):])
        else:
            out = random_bytes(rng)
            if rng.random() < 0.5:
                out = fix_crc(codec.MAGIC + bytes([codec.VERSION]) + bytes(11) + out)
        yield out, expected


def codec_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    return Fuzz(inputs=codec_inputs(rng), target=lambda item: codec.decode(*item), refusals=(ValueError,),
                size=lambda item: len(item[0]) if isinstance(item[0], (bytes, str)) else 0,
                hand_written=len(CODEC_NASTY))


# ---------------------------------------------------------------------------- scenario JSON

HOSTILE_VALUES = [None, True, False, "", "x" * 10_000, [], {}, 0, -1, 0.5, 1, 2, 32, 33, 1e308, -1e308,
                  float("nan"), float("inf"), float("-inf"), 10**400, 2**63, 5e-324, [1, 2], {"a": 1},
                  [[[[[]]]]], "1e3", [float("nan")],
                  # finite, and out of range only in a product or a power: a square (1e155), a cube
                  # (1e103), a reciprocal (1e-300), a negative one
                  1e155, 1e103, 1e-300, -1e200]


def _mutate_tree(data, rng: np.random.Generator):
    """A deep copy of a JSON-like tree with one node deleted, replaced or duplicated."""
    data = copy.deepcopy(data)
    parent, key = None, None
    node = data
    for _ in range(int(rng.integers(0, 4))):  # walk down a few levels
        if isinstance(node, dict) and node:
            parent, key = node, list(node)[int(rng.integers(len(node)))]
        elif isinstance(node, list) and node:
            parent, key = node, int(rng.integers(len(node)))
        else:
            break
        node = parent[key]
    if parent is None:
        return HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))] if rng.random() < 0.2 else data
    action = rng.random()
    if action < 0.25 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.3 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))  # a duplicate (a duplicate device id, say)
    else:
        parent[key] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    return data


def scenario_seeds() -> list[dict]:
    from strategies.allocation.presets import fimi_scenario, ondemand_scenario

    with_demands = ondemand_scenario(3, 1).to_json()
    for device in with_demands["devices"]:
        device["quant_error"], device["codec_constant"] = 1e-3, 2.5
    plain = fimi_scenario(2, 0).to_json()
    for device in plain["devices"]:
        device.pop("class_counts", None)
    return [fimi_scenario(3, 0).to_json(), with_demands, plain]


SCENARIO_NASTY = [
    ("text", b"[" * 100_000 + b"]" * 100_000), ("text", b'{"system": ' + b"1" * 5000 + b"}"),
    ("text", b"\xff\xfe{}"), ("text", b""), ("text", b"NaN"), ("text", b'{"system": {}, "devices": []}'),
    ("text", b"\xef\xbb\xbf{}"), ("text", b'{"a": "\\ud800"}'),
]


def scenario_inputs(rng: np.random.Generator) -> Iterator[tuple[str, object]]:
    seeds = scenario_seeds()
    yield from SCENARIO_NASTY
    big = copy.deepcopy(seeds[2])
    big["devices"] = [{**big["devices"][0], "id": f"d{k}"} for k in range(20_000)]
    yield ("tree", big)
    big["devices"][-1]["gain"] = float("nan")
    yield ("tree", big)
    counts = copy.deepcopy(seeds[0])
    for device in counts["devices"]:
        device["class_counts"], device["d_loc"] = [1e308, 1e308], 1e308
    yield ("tree", counts)
    while True:
        data = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 4))):
            data = _mutate_tree(data, rng)
        if rng.random() < 0.35:  # through the file reader, bytes mutated too
            text = json.dumps(data).encode()
            mutation = int(rng.integers(4))
            text = (flip_bits(text, rng) if mutation == 0 else truncate(text, rng) if mutation == 1
                    else append_noise(text, rng) if mutation == 2 else text)
            yield ("text", text)
        else:
            yield ("tree", data)


def scenario_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    from strategies.allocation.scenario import ScenarioError, load_scenario, parse_scenario

    workdir = tempfile.TemporaryDirectory(prefix="fuzz-scenario-")
    path = Path(workdir.name) / "scenario.json"

    def target(item):
        kind, data = item
        if kind == "tree":
            return parse_scenario(data)
        path.write_bytes(data)
        return load_scenario(path)  # what `fedfill plan FILE` reads

    return Fuzz(inputs=scenario_inputs(rng), target=target, refusals=(ScenarioError,),
                size=lambda item: len(item[1]) if item[0] == "text" else len(json.dumps(item[1], default=str)),
                close=workdir.cleanup, hand_written=len(SCENARIO_NASTY) + 3, scrub=workdir.name)


# ---------------------------------------------------------------------------- the QUERY profile

PROFILE_VALUES = [True, False, "", "x" * 10_000, b"\x00" * 16, 0, -1, 0.5, 1, 2, 32, 33, 1e308, -1e308,
                  float("nan"), float("inf"), 2**63 - 1, -(2**63), 5e-324, [1, 2], [1.0, float("nan")], ["a", "b"],
                  [b"x"], [True], 1.0 - 1e-16]


def profile_seeds() -> list[dict]:
    from strategies.allocation.presets import drawn_device_profile

    fimi = {"d_loc": 120.0, **drawn_device_profile("fimi", 1, 4, 0), "partition_id": 1}
    ondemand = {"d_loc": 40.0, **drawn_device_profile("ondemand", 2, 4, 0), "bits": 8, "codec_constant": 3.0}
    board = {**fimi, "measured": "f_max_hz", "board_cpu_cores": 6, "board_name": "orin-nx", "partition_id": 0}
    return [fimi, ondemand, board]


def profile_inputs(rng: np.random.Generator) -> Iterator[dict]:
    from fedfill import contract

    seeds = profile_seeds()
    yield {"note": {"note": "x" * 100_000}}
    yield {}
    yield {"other": {"d_loc": 1.0}}
    yield {contract.PROFILE_KEY: {}}
    while True:
        profile = dict(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 4))):
            names = list(profile) + ["bits", "quant_error", "codec_constant", "partition_id", "board_x", "extra"]
            name = names[int(rng.integers(len(names)))]
            if name in profile and rng.random() < 0.2:
                del profile[name]
            else:
                profile[name] = PROFILE_VALUES[int(rng.integers(len(PROFILE_VALUES)))]
        yield {contract.PROFILE_KEY: profile}


def profile_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """The server's reading of a profile (server.app.accept_profile: the contract's checks and
    the planner's ranges), then what it does with one it accepted: writes it to profiles.json
    and plans with it (FimiFedAvg._scenario)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedfill import contract
    from server.app import accept_profile
    from strategies.allocation.presets import fimi_scenario
    from strategies.fimi_strategy import FimiFedAvg

    strategy = FimiFedAvg(fimi_scenario(1, 0).system, "fimi", {}, node_wait_s=0.0)

    def inputs():
        for records in profile_inputs(rng):
            try:
                yield RecordDict({key: ConfigRecord(value) for key, value in records.items()})
            except (TypeError, ValueError):  # Flower's own types refuse it: it cannot arrive
                continue

    def target(content):
        profile = accept_profile(content)
        try:
            json.dumps({"1": profile})
            strategy.profiles = {1: profile}
            strategy._scenario([1])
        except Exception as err:
            raise AcceptedButUnusable(f"accept_profile accepted {profile!r:.200}, "
                                      f"then {type(err).__name__}: {err}") from err

    return Fuzz(inputs=inputs(), target=target, refusals=(contract.ReplyError,),
                size=lambda content: sum(len(repr(v)) for r in content.config_records.values() for v in r.values()),
                hand_written=4)


# ---------------------------------------------------------------------------- the TRAIN reply

METRIC_VALUES = [0, -1, 1, 2, 32, 33, 0.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"),
                 2**53 + 1, 2**63 - 1, -(2**63), 5e-324, [1, 2], [1.0, 2.0], [float("nan")], []]
NOTE_VALUES = ["", "x" * 100_000, b"\xff" * 8, 3, 1.5, True, ["a", "b"], [b"x"]]


def reply_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """A planned round of FimiFedAvg; each case is one hostile reply beside a good one, through
    aggregate_train (decode_reply, _account_reply and Flower's FedAvg): refused means the
    strategy dropped the update with its reason, accepted that it averaged it."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict, Error
    from flwr.supercore.task_identity import TaskIdentity

    from fedfill import contract
    from strategies.allocation.presets import fimi_scenario
    from strategies.fimi_strategy import FimiFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has
    logging.getLogger("flwr").setLevel(logging.ERROR)  # the strategy's drop warnings, 10,000 of them
    scenario = fimi_scenario(2, 0)
    profiles = {}
    for k, device in enumerate(scenario.to_json()["devices"]):
        device.pop("class_counts")
        profiles[1000 + k] = device
    rows: list[list[dict]] = []
    strategy = FimiFedAvg(scenario.system, "fimi", profiles, node_wait_s=0.0,
                          on_round_metrics=lambda r, record, nodes: rows.append(nodes))
    model = [np.zeros((3, 2), np.float32), np.ones(4, np.float32)]

    class Online:
        def get_node_ids(self):
            return list(profiles)

    list(strategy.configure_train(1, ArrayRecord(model), ConfigRecord(), Online()))
    hostile_node, good_node = list(profiles)
    update = [np.full((3, 2), 0.5, np.float32), np.full(4, -0.25, np.float32)]

    def good_metrics(payload: bytes) -> contract.TrainMetrics:
        return contract.TrainMetrics(num_examples=50, d_gen_used=10, train_seconds=0.5, train_loss=1.0,
                                     upload_bytes=len(payload), modeled_energy_j=0.1, bits=8, error_expected=1e-3,
                                     error_measured=1e-3, codec_constant=2.0)

    def reply(node_id, content):
        request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=node_id)
        message = Message(content, reply_to=request)
        message.metadata.__dict__["_src_node_id"] = node_id  # Flower sets the sender when the reply travels
        return message

    good_payload = codec.encode(update, 8, np.random.default_rng(0))
    good = reply(good_node, contract.train_reply(good_payload, good_metrics(good_payload), "fine"))
    payloads = codec_inputs(np.random.default_rng(rng.integers(2**32)))
    seeds = [codec.encode(update, bits, np.random.default_rng(bits)) for bits in (2, 4, 8, 16, 32)]

    def contents():
        while True:
            payload = seeds[int(rng.integers(len(seeds)))]
            metrics = dict(good_metrics(payload).to_record())
            note, stype, records = "trained", contract.CODEC_STYPE, None
            for _ in range(int(rng.integers(1, 4))):
                what = int(rng.integers(10))
                if what < 4:  # a metric value, or a key dropped or added
                    keys = list(metrics) + ["measured-energy-j", "measured-s", "extra"]
                    key = keys[int(rng.integers(len(keys)))]
                    if key in metrics and rng.random() < 0.2:
                        del metrics[key]
                    else:
                        metrics[key] = METRIC_VALUES[int(rng.integers(len(METRIC_VALUES)))]
                elif what < 6:
                    candidate = next(payloads)[0]
                    payload = candidate if isinstance(candidate, bytes) else payload
                elif what == 6:
                    note = NOTE_VALUES[int(rng.integers(len(NOTE_VALUES)))]
                elif what == 7:
                    stype = str(rng.choice(["", "numpy.ndarray", contract.CODEC_STYPE + "x", "fedfill.codec/v0"]))
                elif what == 8:
                    records = int(rng.integers(5))
                else:
                    records = "error"
            try:
                metric_record = MetricRecord(metrics)
                note_record = ConfigRecord({"note": note})
            except (TypeError, ValueError):  # Flower's own types refuse it: it cannot arrive
                continue
            array = Array(dtype="uint8", shape=(len(payload),), stype=stype, data=payload)
            parts = {contract.UPDATE_KEY: ArrayRecord({"payload": array}), contract.METRICS_KEY: metric_record,
                     contract.NOTE_KEY: note_record}
            if records == "error":
                request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=hostile_node)
                message = Message(Error(code=0, reason="x" * int(rng.integers(0, 500))), reply_to=request)
                message.metadata.__dict__["_src_node_id"] = hostile_node
                yield message
                continue
            if records == 0:
                parts.pop(contract.UPDATE_KEY)
            elif records == 1:
                parts.pop(contract.METRICS_KEY)
            elif records == 2:
                parts["second"] = MetricRecord({"num-examples": 1})
            elif records == 3:
                parts[contract.UPDATE_KEY] = ArrayRecord({"other": array})
            elif records == 4:
                parts["more"] = ArrayRecord({"payload": array})
            yield reply(hostile_node, RecordDict(parts))

    class Dropped(Exception):
        """The strategy dropped the hostile update; the message is its reason."""

    def target(message):
        rows.clear()
        new, costs = strategy.aggregate_train(1, [message, good])
        (row,) = [r for r in rows[-1] if r["node"] == hostile_node]
        if new is None or any(not np.all(np.isfinite(a)) for a in new.to_numpy_ndarrays()):
            raise AcceptedButUnusable(f"the round's model is {'gone' if new is None else 'not finite'}")
        if row["status"] == "dropped":
            raise Dropped(row["reason"])
        if not np.isfinite(costs["train-loss"]):
            raise AcceptedButUnusable(f"an accepted reply made the round's train-loss {costs['train-loss']}")

    return Fuzz(inputs=contents(), target=target, refusals=(Dropped,),
                size=lambda message: 0 if message.has_error() else contract.reply_bytes(message.content))


# ---------------------------------------------------------------------------- the run's checkpoint.npz

CHECKPOINT_MODEL = [np.zeros((4, 3), np.float32), np.ones(3, np.float32), np.zeros((2, 2, 2), np.float32)]


def _npz(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npy_claiming(shape, dtype="<f4", data=b"") -> bytes:
    """An .npy whose header claims `shape` over `data`."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def zip_bomb() -> bytes:
    """A checkpoint whose arr_0 inflates to 20 MiB of zeros from 20 kB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("arr_0.npy", _npy_claiming((4, 3)) + bytes(20 * 2**20))
        for i in (1, 2):
            archive.writestr(f"arr_{i}.npy", _npy(CHECKPOINT_MODEL[i]))
        archive.writestr("round.npy", _npy(np.array(3)))
    return buffer.getvalue()


def checkpoint_nasty() -> list[bytes]:
    good = {f"arr_{i}.npy": _npy(a + 1) for i, a in enumerate(CHECKPOINT_MODEL)}
    good["round.npy"] = _npy(np.array(3))
    return [
        _npz({**good, "arr_0.npy": _npy_claiming((10**6, 10**6))}),  # 4 TB claimed
        _npz({**good, "arr_0.npy": _npy_claiming((4, 3), "|O")}),
        _npz({**good, "arr_0.npy": _npy(np.array([{"a": 1}] * 12, dtype=object).reshape(4, 3))}),
        _npz({**good, "arr_0.npy": _npy(np.full((4, 3), np.nan, np.float32))}),
        _npz({**good, "round.npy": _npy(np.array(-1))}), _npz({**good, "round.npy": _npy(np.array(2.5))}),
        _npz({**good, "round.npy": _npy(np.arange(3))}),
        _npz({k: v for k, v in good.items() if k != "arr_2.npy"}), _npz({**good, "arr_3.npy": good["arr_0.npy"]}),
        _npz({**good, "arr_0.npy": _npy(np.zeros((3, 4), np.float32))}),
        _npz({**good, "arr_0.npy": _npy(np.zeros((4, 3), np.float64))}),
        _npz({**good, "arr_0.npy": b"\x93NUMPY\x03\x00" + bytes(40)}),
        _npz({**good, "arr_0.npy": b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 65535}),
        zip_bomb(), b"", b"PK\x03\x04", b"not a zip at all",
    ]


def checkpoint_inputs(rng: np.random.Generator) -> Iterator[bytes]:
    from server.checkpoint import write_checkpoint

    yield from checkpoint_nasty()
    seeds = []
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        members = {f"arr_{i}.npy": _npy(a + i) for i, a in enumerate(CHECKPOINT_MODEL)}
        members["round.npy"] = _npy(np.array(2))
        seeds.append(_npz(members, compression))
    with tempfile.TemporaryDirectory() as tmp:  # and the writer's own bytes
        write_checkpoint(Path(tmp) / "c.npz", 4, CHECKPOINT_MODEL)
        seeds.append((Path(tmp) / "c.npz").read_bytes())
    while True:
        data = seeds[int(rng.integers(len(seeds)))]
        kind = int(rng.integers(6))
        if kind == 0:
            yield flip_bits(data, rng)
        elif kind == 1:
            yield truncate(data, rng)
        elif kind == 2:
            yield append_noise(data, rng)
        elif kind == 3:  # a zip field (local or central header) set to an extreme
            offsets = [m.start() for m in re.finditer(b"PK\x01\x02|PK\x03\x04", data)]
            start = offsets[int(rng.integers(len(offsets)))] if offsets else 0
            yield overwrite(data, rng, start + int(rng.integers(4, 46)), "<I",
                            int(rng.choice([0, 1, 2**31, 2**32 - 1, len(data), 10**9])))
        elif kind == 4:  # an .npy header rewritten inside a valid zip
            shape = tuple(int(d) for d in rng.choice([0, 1, 3, 4, 2**31, 10**9], size=int(rng.integers(0, 4))))
            members = {f"arr_{i}.npy": _npy(a) for i, a in enumerate(CHECKPOINT_MODEL)}
            members["round.npy"] = _npy(np.array(1))
            name = list(members)[int(rng.integers(len(members)))]
            members[name] = _npy_claiming(shape, str(rng.choice(["<f4", "<f8", "|u1", "<i8", "|O", "<U5", "|V8"])),
                                          rng.bytes(int(rng.integers(0, 64))))
            yield _npz(members)
        else:
            yield random_bytes(rng)


def checkpoint_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    from server.checkpoint import CheckpointError, read_checkpoint

    workdir = tempfile.TemporaryDirectory(prefix="fuzz-checkpoint-")
    path = Path(workdir.name) / "checkpoint.npz"

    def target(data: bytes):
        path.write_bytes(data)
        return read_checkpoint(path, CHECKPOINT_MODEL)

    return Fuzz(inputs=checkpoint_inputs(rng), target=target, refusals=(CheckpointError,), close=workdir.cleanup,
                hand_written=len(checkpoint_nasty()), scrub=workdir.name)


# ---------------------------------------------------------------------------- the generator checkpoint

GENERATOR_FILES = ("model_index.json", "generator.json", "unet/config.json", "scheduler/scheduler_config.json",
                   "unet/diffusion_pytorch_model.safetensors")


def tiny_generator(directory: Path) -> dict[str, bytes]:
    """A real checkpoint of a small generator (8x8, two classes): its files' bytes."""
    from generation.checkpoint import save_checkpoint
    from generation.config import GeneratorConfig, build_unet

    config = GeneratorConfig(image_size=8, channels=1, num_classes=2, block_out_channels=(8, 16),
                             layers_per_block=1, class_names=("a", "b"))
    import torch

    torch.manual_seed(0)
    save_checkpoint(directory, config, build_unet(config))
    return {name: (directory / name).read_bytes() for name in GENERATOR_FILES}


def _safetensors_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """The safetensors header (8-byte little-endian length, then JSON) mutated as JSON, or its
    length field set to an extreme."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if rng.random() < 0.25:
        lengths = [0, 1, length - 1, length + 1, 2**32, 2**63, 2**64 - 1]
        return struct.pack("<Q", lengths[int(rng.integers(len(lengths)))]) + data[8:]
    names = [k for k in header if k != "__metadata__"]
    entry = header[names[int(rng.integers(len(names)))]]
    field_name = str(rng.choice(["dtype", "shape", "data_offsets"]))
    choices = {"dtype": ["F16", "I64", "BOOL", "F8_E4M3", "X", 3],
               "shape": [[], [0], [10**12], [2**31, 2**31], [-1], "a", [1.5]],
               "data_offsets": [[0, 0], [0, 10**12], [10**12, 0], [-1, 4], [0], "x", [0, len(data)]]}[field_name]
    entry[field_name] = choices[int(rng.integers(len(choices)))]
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def generator_inputs(rng: np.random.Generator, seed_files: dict[str, bytes]) -> Iterator[dict[str, bytes | None]]:
    weights = "unet/diffusion_pytorch_model.safetensors"
    yield {**seed_files, weights: struct.pack("<Q", 2**63) + seed_files[weights][8:]}
    yield {**seed_files, weights: b""}
    yield {**seed_files, "model_index.json": b"[" * 100_000}
    yield {**seed_files, "unet/config.json": b'{"sample_size": ' + b"9" * 5000 + b"}"}
    yield {**seed_files, "unet/config.json": json.dumps({**json.loads(seed_files["unet/config.json"]),
                                                         "sample_size": 10**6}).encode()}
    yield {**seed_files, "model_index.json": None}
    while True:
        files = dict(seed_files)
        name = GENERATOR_FILES[int(rng.integers(len(GENERATOR_FILES)))]
        kind = rng.random()
        if name == weights:
            files[name] = (_safetensors_mutation(files[name], rng) if kind < 0.6 else
                           flip_bits(files[name], rng) if kind < 0.7 else truncate(files[name], rng))
        elif kind < 0.55:
            files[name] = json.dumps(_mutate_tree(json.loads(files[name]), rng)).encode()
        elif kind < 0.75:
            files[name] = flip_bits(files[name], rng)
        elif kind < 0.9:
            files[name] = truncate(files[name], rng)
        else:
            files[name] = None  # the file is missing
        yield files


def generator_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """generation.checkpoint.load_generator, what the generation service and the ddpm job load a
    generator with, on a real (small) checkpoint directory with one file mutated per case."""
    from generation.checkpoint import load_generator
    from generation.config import CheckpointError

    workdir = tempfile.TemporaryDirectory(prefix="fuzz-generator-")
    root = Path(workdir.name)
    seed_files = tiny_generator(root / "seed")
    case_dir = root / "case"

    def target(files: dict[str, bytes | None]):
        for name, data in files.items():
            path = case_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        return load_generator(case_dir)

    return Fuzz(inputs=generator_inputs(rng, seed_files), target=target, refusals=(CheckpointError,),
                size=lambda files: sum(len(d) for d in files.values() if d), close=workdir.cleanup,
                hand_written=6, scrub=str(case_dir))


# name -> builder; the slowest first, so that --jobs runs them beside the quick ones
# ---------------------------------------------------------------------------- the generation service

class Rejected(Exception):
    """A gRPC status the service gives a request it refuses (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""


def generate_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """Generate over real gRPC: a service in its own process (bench/fuzz_service.py, whose
    hostile requests these are), one channel. A refusal is a status with its reason; any other
    status, a dead server or an answer against the request's expectation is a crash."""
    import grpc

    if str(Path(__file__).parent) not in sys.path:  # its sibling, also when imported from the tests
        sys.path.insert(0, str(Path(__file__).parent))
    import fuzz_service as fs

    scratch = tempfile.TemporaryDirectory(prefix="fuzz-generate-")
    service = fs.ServiceProcess(scratch.name, max_images=fs.FUZZ_MAX_IMAGES)
    channel = grpc.insecure_channel(service.address)

    def inputs():
        while True:
            yield fs.hostile_case(rng, service.num_classes, service.max_images)

    def target(case):
        try:
            got = fs.images_in(fs.call_raw(channel, case.data), service.image_shape)
        except grpc.RpcError as err:
            if err.code() in fs.REJECTIONS and err.details():
                if case.expect == "accept":
                    raise AcceptedButUnusable(f"a valid request refused: {err.details()}") from None
                raise Rejected(f"{err.code().name}: {err.details()}") from None
            raise RuntimeError(f"{err.code().name}: {err.details()} (server alive: {service.alive()})") from None
        if case.expect == "reject" or (case.images is not None and got != case.images):
            raise AcceptedButUnusable(f"{case.kind}: answered with {got} images")
        return got

    def close():
        channel.close()
        service.stop()
        scratch.cleanup()

    return Fuzz(inputs=inputs(), target=target, refusals=(Rejected,), size=lambda case: len(case.data), close=close,
                scrub=scratch.name)


# ---------------------------------------------------------------------------- a pricing game

def game_seeds() -> list[dict]:
    """The design note's worked example, continuous and in whole units, and a random game."""
    devices = [{"theta": t, "capacity": c, "unit_cost": 0.358, "fixed_cost": 0.116, "units": 12}
               for t, c in ((1.0, 3.0), (1.5, 4.5), (0.8, 6.0))]
    rng = np.random.default_rng(0)
    random = [{"theta": float(rng.uniform(0.2, 2)), "capacity": float(rng.uniform(1, 8)),
               "unit_cost": float(rng.uniform(0.1, 0.6)), "fixed_cost": float(rng.uniform(0, 0.5)),
               "units": int(rng.integers(4, 16))} for _ in range(10)]
    return [{"server_cost": 0.6, "revenue": 40, "integer": False, "devices": devices},
            {"server_cost": 0.6, "revenue": 40, "integer": True, "devices": devices},
            {"server_cost": 0.4, "revenue": 10, "integer": True, "devices": random}]


def game_inputs(rng: np.random.Generator) -> Iterator[bytes]:
    seeds = game_seeds()
    huge = {**seeds[1], "devices": [{**seeds[1]["devices"][0], "units": 1e15, "capacity": 1e15, "unit_cost": 1e-9}]}
    many = {**seeds[0], "devices": seeds[0]["devices"] * 40_000}
    for nasty in (huge, many, {**seeds[0], "server_cost": 1e308}, {**seeds[0], "devices": [{}]}, {"devices": 3}):
        yield json.dumps(nasty).encode()
    while True:
        data = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 4))):
            data = _mutate_tree(data, rng)
        text = json.dumps(data, default=str).encode()
        if rng.random() < 0.3:
            mutation = int(rng.integers(3))
            text = (flip_bits(text, rng) if mutation == 0 else truncate(text, rng) if mutation == 1
                    else append_noise(text, rng))
        yield text


def game_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """`fedfill price GAME.json`'s reader and the exact solver: a refused game is a GameError
    with the reason; an accepted one solves to a finite utility no lower than offloading
    nothing (the exact optimum never loses to p = 0)."""
    from strategies.allocation.stackelberg import GameError, parse_game, solve_price

    def target(text: bytes):
        try:
            decoded = text.decode()
        except UnicodeDecodeError as err:
            raise GameError(f"not UTF-8: {err}") from None
        solution = solve_price(parse_game(decoded))
        if not (np.isfinite(solution.leader_utility) and
                solution.leader_utility >= solution.utility_without_offloading - 1e-9 * abs(
                    solution.utility_without_offloading)):
            raise AcceptedButUnusable(f"solved to {solution.leader_utility!r} against "
                                      f"{solution.utility_without_offloading!r} without offloading")

    return Fuzz(inputs=game_inputs(rng), target=target, refusals=(GameError,), hand_written=5)


# ---------------------------------------------------------------------------- a pricer checkpoint

def pricer_seeds(directory: Path) -> list[dict]:
    """pricer.json of a random pricer and of an (untrained) GDM, whose actor.pt stays beside it."""
    from strategies.learned.envs import GameDraw
    from strategies.learned.pricers import save_pricer, train_pricer

    seeds = []
    for kind in ("random", "gdm"):
        save_pricer(train_pricer(kind, GameDraw(devices=3), 0), directory)
        seeds.append(json.loads((directory / "pricer.json").read_text()))
    return seeds


def pricer_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """`fedfill price --pricer DIR` and the federated run's pricer: a refused pricer.json is a
    PricerError with the reason; an accepted one prices a game of its size within [0, 1]."""
    from strategies.learned.pricers import PricerError, load_pricer

    workdir = tempfile.TemporaryDirectory(prefix="fuzz-pricer-")
    directory = Path(workdir.name)
    seeds = pricer_seeds(directory)

    def inputs():
        yield json.dumps({**seeds[1], "settings": {**seeds[1]["settings"], "hidden": 10**9}}).encode()
        yield json.dumps({**seeds[0], "draw": {**seeds[0]["draw"], "devices": 10**9}}).encode()
        while True:
            data = seeds[int(rng.integers(len(seeds)))]
            for _ in range(int(rng.integers(1, 3))):
                data = _mutate_tree(data, rng)
            text = json.dumps(data, default=str).encode()
            yield flip_bits(text, rng) if rng.random() < 0.2 else text

    def target(text: bytes):
        (directory / "pricer.json").write_bytes(text)
        pricer = load_pricer(directory)
        states = np.zeros((2, 1 + 3 * pricer.draw.devices), np.float32)
        actions = pricer.act(states, np.random.default_rng(0))
        if not (actions.shape == (2, 1) and np.all(np.abs(actions) <= 1)):
            raise AcceptedButUnusable(f"acted {actions!r}")

    return Fuzz(inputs=inputs(), target=target, refusals=(PricerError,), close=workdir.cleanup, hand_written=2,
                scrub=workdir.name)


# ---------------------------------------------------------------------------- a delivered state

def delivery_seeds() -> list[bytes]:
    """Real STATE replies of the shipped generator's shape (8x8x1) at a few widths: the bytes
    of an ImageBatch as a device receives them."""
    from fedfill.codec import encode
    from generation import generation_pb2

    rng = np.random.default_rng(0)
    seeds = []
    for n, bits in ((1, 32), (3, 8), (5, 2)):
        states = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
        seeds.append(generation_pb2.ImageBatch(
            state=encode([states], bits, rng), labels=list(range(n)), height=8, width=8, channels=1,
            delivery=generation_pb2.STATE, resume_index=3, timestep=500, noise_var=0.01,
            checkpoint_digest="0" * 64, sampler="ddim").SerializeToString())
    return seeds


def delivery_inputs(rng: np.random.Generator) -> Iterator[bytes]:
    from generation import generation_pb2

    seeds = delivery_seeds()
    batch = generation_pb2.ImageBatch.FromString(seeds[1])
    for change in ({"height": 2 ** 31 - 1}, {"width": 0}, {"channels": -1}, {"noise_var": float("nan")},
                   {"noise_var": -1.0}, {"noise_var": float("inf")}, {"state": b""}, {"state": seeds[0]}):
        hostile = generation_pb2.ImageBatch()
        hostile.CopyFrom(batch)
        for key, value in change.items():
            setattr(hostile, key, value)
        yield hostile.SerializeToString()
    hostile = generation_pb2.ImageBatch()
    hostile.CopyFrom(batch)
    del hostile.labels[:]
    hostile.labels.extend([0] * 10 ** 5)
    yield hostile.SerializeToString()
    while True:
        seed = seeds[int(rng.integers(len(seeds)))]
        how = int(rng.integers(4))
        if how == 0:
            yield flip_bits(seed, rng)
        elif how == 1:
            yield truncate(seed, rng)
        elif how == 2:  # the state payload itself mutated, the message around it intact
            hostile = generation_pb2.ImageBatch.FromString(seed)
            hostile.state = fix_crc(flip_bits(hostile.state, rng, at_least=16)) if rng.integers(2) else \
                truncate(hostile.state, rng)
            yield hostile.SerializeToString()
        else:
            yield append_noise(seed, rng)


def delivery_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """generation.client.decode_reply, what a device makes of a STATE reply before completing
    it: a truncated or corrupted payload, a NaN, sizes that do not add up are refused
    (MalformedReply), never completed."""
    from google.protobuf.message import DecodeError

    from generation import generation_pb2
    from generation.client import MalformedReply, decode_reply

    def target(data: bytes):
        states = decode_reply([generation_pb2.ImageBatch.FromString(data)], "state").batches[0].states
        if not np.isfinite(states).all():
            raise AcceptedButUnusable("decode_reply accepted a state that is not finite")

    return Fuzz(inputs=delivery_inputs(rng), target=target, refusals=(MalformedReply, DecodeError), hand_written=9)


# ---------------------------------------------------------------------------- a TRAIN message's plan

PLAN_VALUES = [0, -1, 1, 2, 20, 33, 0.3, -0.3, 1e15, 1e16, 1e308, float("nan"), float("inf"), float("-inf"),
               2**53 + 1, 2**63 - 1, -(2**63), 5e-324, True, "", "state", "x" * 100_000, "0.3", [1, 2], [0.3], b"\xff"]


def plan_seeds() -> list[dict]:
    """Plans as a device receives them (NodePlan.to_config): a fill round, a priced one, a
    planned split delivery."""
    from fedfill import contract

    base = contract.NodePlan(server_round=3, policy="fimi", d_gen=115, f_hz=1.4e9, b_hz=1e6, p_w=0.1, eta=0.4,
                             bits=8, t_cmp_s=2.0, t_com_s=3.0, e_cmp_j=0.01, e_com_j=0.02)
    from dataclasses import replace

    return [base.to_config(), replace(base, gen_price=0.3, gen_delivery="").to_config(),
            replace(base, gen_delivery="state", gen_server_steps=10, gen_state_bits=4, gen_price=0.05).to_config()]


def plan_inputs(rng: np.random.Generator) -> Iterator[dict]:
    seeds = plan_seeds()
    yield {}
    yield {**seeds[1], "gen-price": float("nan")}
    yield {**seeds[1], "gen-price": 1e300}
    yield {**seeds[1], "bits": 2**64}
    while True:
        plan = dict(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 4))):
            name = list(plan)[int(rng.integers(len(plan)))]
            if rng.random() < 0.15:
                del plan[name]
            else:
                plan[name] = PLAN_VALUES[int(rng.integers(len(PLAN_VALUES)))]
        yield plan


def plan_fuzz(rng: np.random.Generator, cases: int) -> Fuzz:
    """NodePlan.from_config, what a device makes of its TRAIN message's plan, then what it does
    with the price: its best response in sampler steps (strategies.allocation.offloading). A
    refusal is a ReplyError naming the field; an accepted plan must price without a crash."""
    from flwr.app import ConfigRecord

    from fedfill import contract
    from strategies.allocation.offloading import best_response

    def inputs():
        for plan in plan_inputs(rng):
            try:
                yield ConfigRecord(plan)
            except (TypeError, ValueError):  # Flower's own types refuse it: it cannot arrive
                continue

    def target(record):
        plan = contract.NodePlan.from_config(record)
        try:
            k = best_response(plan.gen_price, 500.0, 4000.0, 100, 20)
        except Exception as err:
            raise AcceptedButUnusable(f"from_config accepted a price {plan.gen_price!r}, then {type(err).__name__}: "
                                      f"{err}") from err
        if not 0 <= k <= 20:
            raise AcceptedButUnusable(f"a price {plan.gen_price!r} drew {k} of 20 steps")

    return Fuzz(inputs=inputs(), target=target, refusals=(contract.ReplyError,),
                size=lambda record: sum(len(repr(v)) for v in record.values()), hand_written=4)


ENTRY_POINTS: dict[str, Callable[[np.random.Generator, int], Fuzz]] = {
    "node_plan": plan_fuzz,
    "generator_checkpoint": generator_fuzz,
    "train_reply": reply_fuzz,
    "codec.decode": codec_fuzz,
    "scenario": scenario_fuzz,
    "profile": profile_fuzz,
    "checkpoint": checkpoint_fuzz,
    "generate": generate_fuzz,
    "delivery_reply": delivery_fuzz,
    "pricing_game": game_fuzz,
    "pricer_checkpoint": pricer_fuzz,
}


def fuzz_entry(name: str, cases: int, seed: int = 0, time_limit_s: float = 10.0, memory_every: int = 50) -> Result:
    """Build entry point `name` from its own seeded Generator and throw `cases` inputs at it."""
    rng = np.random.default_rng([seed, *name.encode()])
    fuzz = ENTRY_POINTS[name](rng, cases)
    return run_entry(name, fuzz, cases, time_limit_s, memory_every)


def print_result(result: Result, reasons: int = 8) -> None:
    print(f"{result.name}: tried {result.tried}, refused {sum(result.refused.values())}, accepted {result.accepted}, "
          f"crashes {len(result.crashes)}, hangs {result.hangs}, worst {result.worst_s * 1e3:.1f} ms/case, "
          f"peak memory {result.peak_bytes / 2**20:.2f} MiB (on an input of {result.peak_input_bytes} bytes), "
          f"{result.seconds:.0f} s")
    for reason, count in result.refused.most_common(reasons):
        print(f"    {count:6d}  {reason}")
    rest = sum(result.refused.values()) - sum(c for _, c in result.refused.most_common(reasons))
    if rest:
        print(f"    {rest:6d}  ({len(result.refused) - reasons} other reason classes)")
    for crash in result.crashes[:10]:
        print(f"    CRASH {crash}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="hostile inputs per entry point (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(ENTRY_POINTS), help="these entry points only")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds one case may take (a hang beyond)")
    parser.add_argument("--memory-every", type=int, default=50, help="trace the memory of every N-th case")
    parser.add_argument("--jobs", type=int, default=2, help="entry points fuzzed at once, one process each")
    args = parser.parse_args(argv)
    names = args.only or list(ENTRY_POINTS)
    jobs = [(name, args.cases, args.seed, args.time_limit, args.memory_every) for name in names]
    if args.jobs > 1 and len(names) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(names)), maxtasksperchild=1) as pool:
            results = pool.starmap(fuzz_entry, jobs, chunksize=1)
    else:
        results = [fuzz_entry(*job) for job in jobs]
    failed = False
    for result in results:
        print_result(result)
        bounded = result.memory_bounded
        if not bounded:
            print(f"    MEMORY one input made the parser allocate {result.peak_bytes / 2**20:.0f} MiB")
        failed |= not result.ok
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
