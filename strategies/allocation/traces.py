"""Device traces: when each device of a fleet is on, and how fast it computes and sends then.

Here and not in `fedfill/`: only the planner's side reads a trace (the strategy samples and plans
by it, the pre-run checks and `fedfill traces` write and check it); a device never does, and its
capacity factors are stated in the cost model's own terms (f_max, the channel gain), so the module
sits beside the scenario it scales. Standard library and numpy only, like every solver here.

The format (JSON, `fedfill-traces` version 1), keyed by partition id, the device index 0..N-1:

    {"format": "fedfill-traces", "version": 1,
     "period_s": 86400,                     optional: the trace repeats after this (null: it does not)
     "devices": {
       "0": {"on": [[0, 3600], [7200, 86400]],        [start_s, end_s): the device is on
             "capacity": [[0, 1.0, 1.0], [3600, 0.5, 2.0]],   optional: [t_s, cpu, uplink] from t_s on
             "period_s": 43200,             optional: this device's own period
             "source": "fedscale:1234"},    optional: where the device came from
       ...}}

Intervals are sorted, non-overlapping (touching ones are one), with 0 <= start < end, within the
period where there is one. A device is off outside its intervals, so off for good after the last
one of a trace that does not repeat. `cpu` multiplies the device's f_max; `uplink` multiplies
its uplink rate at its share of the band and full power (`scaled_profile`); before a device's
first capacity row both are 1.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "fedfill-traces"
VERSION = 1
GAIN_RANGE = (1e-30, 1e3)  # the planner's range of channel gains (scenario._DEVICE_RULES)


class TraceError(ValueError):
    """A trace that cannot be used, and why."""


@dataclass(frozen=True)
class DeviceTrace:
    on: np.ndarray  # (k, 2): sorted disjoint [start, end) intervals, touching ones merged
    capacity: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (m, 3): t, cpu, uplink
    period_s: float | None = None
    source: str = ""

    def _intervals(self, t_from: float, t_to: float):
        """The on intervals in absolute time that reach into [t_from, t_to], a periodic trace
        unrolled, the ones touching across a period's end joined."""
        if self.period_s is None:
            shifted = [self.on]
        else:
            first, last = math.floor(t_from / self.period_s), math.floor(t_to / self.period_s)
            shifted = [self.on + k * self.period_s for k in range(first, last + 1)]
        merged: list[list[float]] = []
        for start, end in np.concatenate(shifted) if shifted else []:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([float(start), float(end)])
        return [(s, e) for s, e in merged if e > t_from and s <= t_to]

    def available(self, t: float) -> bool:
        return any(s <= t < e for s, e in self._intervals(t, t))

    def off_at(self, t0: float, t1: float) -> float | None:
        """When a device on at t0 goes off before t1 (it is on through [t0, t1) otherwise: None)."""
        for s, e in self._intervals(t0, t1):
            if s <= t0 < e:
                return e if e < t1 else None
        return t0  # off already

    def next_on(self, t: float) -> float | None:
        """The first time at or after t the device is on; None when it never is again."""
        horizon = t + self.period_s if self.period_s is not None else math.inf
        for s, e in self._intervals(t, horizon):
            if e > t:
                return max(s, t)
        return None

    def capacity_at(self, t: float) -> tuple[float, float]:
        """(cpu, uplink) factors at t: the last capacity row at or before t, (1, 1) before any."""
        if len(self.capacity) == 0:
            return 1.0, 1.0
        local = t % self.period_s if self.period_s is not None else t
        i = int(np.searchsorted(self.capacity[:, 0], local, side="right")) - 1
        return (1.0, 1.0) if i < 0 else (float(self.capacity[i, 1]), float(self.capacity[i, 2]))

    def to_json(self) -> dict:
        out: dict = {"on": self.on.tolist()}
        if len(self.capacity):
            out["capacity"] = self.capacity.tolist()
        if self.period_s is not None:
            out["period_s"] = self.period_s
        if self.source:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class Traces:
    devices: dict[int, DeviceTrace]  # partition id -> its trace

    def available(self, partition: int, t: float) -> bool:
        return self.devices[partition].available(t)

    def capacity_at(self, partition: int, t: float) -> tuple[float, float]:
        return self.devices[partition].capacity_at(t)

    def off_at(self, partition: int, t0: float, t1: float) -> float | None:
        return self.devices[partition].off_at(t0, t1)

    def round_start(self, t: float, partitions) -> float | None:
        """When a round asked to start at t can: t if one of `partitions` is on, else when the
        first of them comes on; None when none ever does again."""
        starts = [s for s in (self.devices[p].next_on(t) for p in partitions) if s is not None]
        return min(starts, default=None)

    def check_fleet(self, nodes: int) -> None:
        """TraceError unless the trace holds exactly the devices 0..nodes-1, one of them ever on."""
        extra = sorted(p for p in self.devices if not 0 <= p < nodes)
        missing = sorted(set(range(nodes)) - set(self.devices))
        if extra:
            raise TraceError(f"it names device(s) {_few(extra)} the fleet does not have: the run's devices are "
                             f"0..{nodes - 1} (--nodes {nodes})")
        if missing:
            raise TraceError(f"it lacks device(s) {_few(missing)} of the fleet's {nodes} (--nodes): give every "
                             "device an entry (an empty \"on\" list: one that is never on)")
        if all(len(self.devices[p].on) == 0 for p in range(nodes)):
            raise TraceError("no device is ever on: the run could train nobody")

    def to_json(self, period_s: float | None = None) -> dict:
        return {"format": FORMAT, "version": VERSION, **({"period_s": period_s} if period_s is not None else {}),
                "devices": {str(p): self.devices[p].to_json() for p in sorted(self.devices)}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path


def _few(items: list) -> str:
    return ", ".join(map(str, items[:8])) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _number(value, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TraceError(f"{what}: {value!r} is not a finite number")
    if value < 0 or (positive and value == 0):
        raise TraceError(f"{what}: {value!r} must be {'positive' if positive else '0 or more'}")
    return float(value)


def _rows(value, width: int, what: str) -> list:
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == width for r in value):
        raise TraceError(f"{what}: expected a list of [{', '.join(['...'] * width)}] rows of {width} numbers")
    return value


def parse_device(data, name: str, period_s: float | None) -> DeviceTrace:
    if not isinstance(data, dict) or "on" not in data:
        raise TraceError(f"device {name}: expected an object with an \"on\" list of [start_s, end_s) intervals")
    unknown = set(data) - {"on", "capacity", "period_s", "source"}
    if unknown:
        raise TraceError(f"device {name}: unknown key(s) {sorted(unknown)} (on, capacity, period_s, source)")
    if data.get("period_s") is not None:
        period_s = _number(data["period_s"], f"device {name} period_s", positive=True)
    on = []
    for i, row in enumerate(_rows(data["on"], 2, f"device {name} on")):
        start, end = (_number(v, f"device {name} interval {i}") for v in row)
        if start >= end:
            raise TraceError(f"device {name} interval {i} [{start:g}, {end:g}): its end must come after its start")
        if period_s is not None and end > period_s:
            raise TraceError(f"device {name} interval {i} [{start:g}, {end:g}) reaches past the period {period_s:g} s")
        if on and start < on[-1][1]:
            raise TraceError(f"device {name} interval {i} [{start:g}, {end:g}) overlaps or comes before the one "
                             f"ending at {on[-1][1]:g}: intervals must be sorted and apart")
        if on and start == on[-1][1]:
            on[-1][1] = end  # touching: one interval
        else:
            on.append([start, end])
    capacity = []
    for i, row in enumerate(_rows(data.get("capacity", []), 3, f"device {name} capacity")):
        t = _number(row[0], f"device {name} capacity row {i} time")
        cpu, uplink = (_number(v, f"device {name} capacity row {i} factor", positive=True) for v in row[1:])
        if capacity and t <= capacity[-1][0]:
            raise TraceError(f"device {name} capacity row {i}: times must increase ({t:g} after {capacity[-1][0]:g})")
        capacity.append([t, cpu, uplink])
    source = data.get("source", "")
    return DeviceTrace(np.array(on, dtype=float).reshape(-1, 2), np.array(capacity, dtype=float).reshape(-1, 3),
                       period_s, str(source))


def parse_traces(data) -> Traces:
    """A trace from its JSON form, every figure checked; TraceError naming the first fault."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"not a trace file: expected a JSON object with \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise TraceError(f"version {data.get('version')!r}: this fedfill reads version {VERSION}")
    period = data.get("period_s")
    period = None if period is None else _number(period, "period_s", positive=True)
    devices = data.get("devices")
    if not isinstance(devices, dict) or not devices:
        raise TraceError("no devices: \"devices\" must map partition ids (\"0\", \"1\", ...) to their traces")
    parsed = {}
    for name, device in devices.items():
        if not (isinstance(name, str) and name.isdigit() and str(int(name)) == name):
            raise TraceError(f"device {name!r}: keys are partition ids, 0, 1, 2, ...")
        parsed[int(name)] = parse_device(device, name, period)
    return Traces(parsed)


def load_traces(path: str | Path) -> Traces:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise TraceError(f"cannot read it: {err.strerror or err}") from None
    if not text.strip():
        raise TraceError("the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TraceError(f"not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    return parse_traces(data)


def scaled_profile(profile: dict, cpu: float, uplink: float, noise_w_per_hz: float, band_hz: float) -> dict:
    """A device profile as a trace has it at one time: f_max times `cpu`, and the channel gain
    that makes the device's rate at `band_hz` (its share of the band) and full power `uplink`
    times its own: log2(1 + SNR') = uplink x log2(1 + SNR), clipped to the planner's gains."""
    snr = profile["gain"] * profile["p_max_w"] / (noise_w_per_hz * band_hz)
    log_snr = uplink * math.log1p(snr)  # ln(1 + SNR'), kept in logs: SNR^uplink overflows
    gain = math.expm1(min(log_snr, 700.0)) * noise_w_per_hz * band_hz / profile["p_max_w"]
    return {**profile, "f_max_hz": profile["f_max_hz"] * cpu, "gain": float(np.clip(gain, *GAIN_RANGE))}


# ---------------------------------------------------------------------------- synthetic traces
DAY_S = 86400.0


def synth_traces(nodes: int, hours: float, seed: int, *, mean_on_s: float = 3 * 3600.0,
                 mean_off_s: float = 1.5 * 3600.0, cpu_sigma: float = 0.5, uplink_sigma: float = 0.7,
                 jitter_sigma: float = 0.2) -> Traces:
    """A fleet of `nodes` devices over `hours`, drawn from `seed` alone: each device alternates
    on and off periods (exponential, means `mean_on_s` and `mean_off_s`), the on periods longer
    and the off ones shorter around its own night (a diurnal phase per device: phones on the
    charger); a lognormal compute and uplink factor per device (median 1) and an hourly
    lognormal jitter on its uplink."""
    if nodes < 1 or not (math.isfinite(hours) and hours > 0):
        raise TraceError("synthetic traces need at least 1 node and a positive number of hours")
    rng = np.random.default_rng(seed)
    horizon = hours * 3600.0
    devices = {}
    for k in range(nodes):
        night = rng.uniform(0, DAY_S)  # when this device's night peaks
        cpu, uplink = rng.lognormal(0.0, cpu_sigma), rng.lognormal(0.0, uplink_sigma)

        def diurnal(t: float) -> float:  # e^(0.8 cos): 2.2 at the device's night, 0.45 at its noon
            return math.exp(0.8 * math.cos(2 * math.pi * (t - night) / DAY_S))

        t, on_now, intervals = 0.0, rng.random() < mean_on_s / (mean_on_s + mean_off_s), []
        while t < horizon:
            mean = mean_on_s * diurnal(t) if on_now else mean_off_s / diurnal(t)
            end = min(horizon, t + max(60.0, rng.exponential(mean)))
            if on_now:
                intervals.append([round(t, 3), round(end, 3)])
            t, on_now = end, not on_now
        steps = np.arange(0.0, horizon, 3600.0)
        jitter = rng.lognormal(0.0, jitter_sigma, size=len(steps))
        capacity = [[float(s), round(float(cpu), 4), round(float(uplink * j), 4)] for s, j in zip(steps, jitter)]
        devices[k] = parse_device({"on": intervals, "capacity": capacity, "source": f"synth:{seed}"}, str(k), None)
    return Traces(devices)


# ---------------------------------------------------------------------------- FedScale's traces
class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, numbers, strings (which need no class lookup);
    any class or function a pickle names (the way a hostile one runs code) is refused."""

    ALLOWED = {("builtins", "dict"), ("builtins", "list"), ("builtins", "int"), ("builtins", "float"),
               ("builtins", "str")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise TraceError(f"it names {module}.{name}: a FedScale trace holds plain dicts, lists, numbers and "
                         "strings only; refusing to load anything else")


def read_plain_pickle(path: str | Path, what: str):
    try:
        with open(path, "rb") as fh:
            return _PlainUnpickler(fh).load()
    except TraceError as err:
        raise TraceError(f"{what} {path}: {err}") from None
    except OSError as err:
        raise TraceError(f"{what} {path}: cannot read it: {err.strerror or err}") from None
    except Exception as err:  # truncated or not a pickle: UnpicklingError, EOFError, ValueError, ...
        raise TraceError(f"{what} {path}: not a pickle of plain data ({type(err).__name__}: {err})") from None


def _client_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).isdigit():
        raise TraceError(f"client id {key!r} is not a whole number")
    return int(key)


def from_fedscale(behave, capacity, nodes: int | None = None) -> Traces:
    """FedScale's client behaviour trace (client id -> {'active': [s], 'inactive': [s],
    'finish_time': s, ...}: on from active[i] to inactive[i], repeating every finish_time) and
    device capacity file (client id -> {'computation': ms per sample, 'communication': kbps}) as
    a fedfill trace of the first `nodes` clients (by id) that both name: partition k is the k-th.
    Capacities become factors against the converted fleet's medians (a client twice as fast as
    the median computes at cpu 2). TraceError where either is not of that shape."""
    for data, what in ((behave, "behaviour trace"), (capacity, "capacity file")):
        if not isinstance(data, dict) or not data:
            raise TraceError(f"the {what} is not a non-empty dict of client id -> record")
    behave = {_client_key(k): v for k, v in behave.items()}
    capacity = {_client_key(k): v for k, v in capacity.items()}
    ids = sorted(set(behave) & set(capacity))
    if not ids:
        raise TraceError("the behaviour trace and the capacity file have no client id in common")
    if nodes is not None:
        if not 1 <= nodes <= len(ids):
            raise TraceError(f"--nodes {nodes}: the two files share {len(ids)} client(s)")
        ids = ids[:nodes]
    speeds = []
    for cid in ids:
        record = capacity[cid]
        if not isinstance(record, dict) or not {"computation", "communication"} <= set(record):
            raise TraceError(f"capacity of client {cid}: expected {{'computation': ms, 'communication': kbps}}")
        speeds.append((_number(record["computation"], f"client {cid} computation", positive=True),
                       _number(record["communication"], f"client {cid} communication", positive=True)))
    ms_median, kbps_median = np.median([s[0] for s in speeds]), np.median([s[1] for s in speeds])
    devices = {}
    for k, (cid, (ms, kbps)) in enumerate(zip(ids, speeds)):
        record = behave[cid]
        if not isinstance(record, dict) or not {"active", "inactive", "finish_time"} <= set(record):
            raise TraceError(f"behaviour of client {cid}: expected {{'active': [...], 'inactive': [...], "
                             "'finish_time': ...}")
        active, inactive = record["active"], record["inactive"]
        if not (isinstance(active, list) and isinstance(inactive, list)) or len(active) != len(inactive):
            raise TraceError(f"behaviour of client {cid}: 'active' and 'inactive' must be lists of equal length")
        period = _number(record["finish_time"], f"client {cid} finish_time", positive=True)
        intervals = [[_number(a, f"client {cid} active time"), _number(i, f"client {cid} inactive time")]
                     for a, i in zip(active, inactive)]
        # past finish_time: never reached; of no length: never on (a reversed one is refused below)
        data = {"on": [[a, min(i, period)] for a, i in intervals if a < period and a != i],
                "capacity": [[0.0, float(ms_median / ms), float(kbps / kbps_median)]], "source": f"fedscale:{cid}"}
        devices[k] = parse_device(data, f"{k} (FedScale client {cid})", period)
    return Traces(devices)
