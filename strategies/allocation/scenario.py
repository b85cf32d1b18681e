"""Scenario files: the system parameters and the device profiles a plan is solved for.

The JSON layout is a public contract (README, "Scenario and plan JSON"); every number is SI.
Validation names the field and the device at fault, because a plan for a thousand devices
that fails on "invalid value" is no help to anyone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np


class ScenarioError(ValueError):
    """A malformed scenario: the message names the field (and device) at fault."""


@dataclass(frozen=True)
class System:
    bandwidth_hz: float  # B, shared by all devices (FDMA)
    noise_w_per_hz: float  # N0
    t_max_s: float  # latency budget of one round
    model_params: float  # M, parameters in the uploaded update
    tau: float  # local epochs
    omega: float  # CPU cycles per training sample
    delta_max: float  # maximum global learning error Delta_max, in (0, 1)
    rounds: float  # N, global rounds
    zeta: float  # constant of the convergence bound ([FIMI eq. 3])
    alpha: float  # learning model delta = alpha D^-beta - gamma
    beta: float
    gamma: float
    d_gen_max: float  # cap on synthetic samples per device

    def learning_error_budget(self, num_devices: int) -> float:
        """Right-hand side of constraint [FIMI eq. 13a]: the sum of local errors the target allows."""
        return num_devices * (1.0 + self.zeta / self.rounds * math.log(self.delta_max))


# field -> (must be strictly positive, the range it must lie in). The ranges hold every real
# deployment by orders of magnitude and keep the solvers' products and powers inside float
# range: a t_max of 1e308 or an alpha of 1e308 is a finite number that overflowed them.
_SYSTEM_RULES = {
    "bandwidth_hz": (True, (1e-3, 1e12)), "noise_w_per_hz": (True, (1e-40, 1.0)), "t_max_s": (True, (1e-6, 1e7)),
    "model_params": (True, (1.0, 1e13)), "tau": (True, (1e-6, 1e6)), "omega": (True, (1e-3, 1e15)),
    "delta_max": (True, (0.0, 1.0)), "rounds": (True, (1e-3, 1e9)), "zeta": (True, (1e-12, 1e6)),
    "alpha": (True, (1e-12, 1e6)), "beta": (True, (1e-3, 1e3)), "gamma": (False, (0.0, 1e6)),
    "d_gen_max": (False, (0.0, 1e12)),
}
_DEVICE_RULES = {"d_loc": (True, (1e-3, 1e12)), "f_max_hz": (True, (1e-3, 1e13)), "eps": (True, (1e-45, 1.0)),
                 "p_max_w": (True, (1e-12, 1e4)), "gain": (True, (1e-30, 1e3))}
MAX_LOG10_POWER = 300  # alpha^(3/beta), the convergence model's power in [FIMI eq. 22], must stay below 1e300


@dataclass(frozen=True)
class Devices:
    """Device profiles as arrays, one entry per device, so every solver step is vectorized."""

    ids: tuple[str, ...]
    d_loc: np.ndarray
    f_max: np.ndarray
    eps: np.ndarray
    p_max: np.ndarray
    gain: np.ndarray
    bits: np.ndarray  # int, quantization bits of the upload (32 = none)
    quant_error: np.ndarray  # relative quantization-error demand in (0, 1), NaN where not given
    class_counts: tuple[np.ndarray, ...] | None  # local samples per class, when known
    # the codec constant K a device measured on its last update (relative error ~ K / (L-1)^2,
    # quantization.py); NaN where unknown: the planner then uses the prior from System.model_params
    codec_constant: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.codec_constant is None:
            object.__setattr__(self, "codec_constant", np.full(n, np.nan))
        else:
            object.__setattr__(self, "codec_constant",
                               np.broadcast_to(np.asarray(self.codec_constant, dtype=float), (n,)).copy())
        # Built in code, not only parsed: the same rules (vectorized; subset and with_bits rebuild).
        q, c = np.asarray(self.quant_error, dtype=float), self.codec_constant
        bad_q = np.flatnonzero(~np.isnan(q) & ~((q > 0) & (q < 1)))
        if bad_q.size:
            _check_demand(float(q[bad_q[0]]), f"device '{self.ids[bad_q[0]]}': field 'quant_error'")
        bad_c = np.flatnonzero(~np.isnan(c) & ~(np.isfinite(c) & (c > 0)))
        if bad_c.size:
            raise ScenarioError(f"device '{self.ids[bad_c[0]]}': field 'codec_constant' must be finite and "
                                f"positive, got {float(c[bad_c[0]])!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> "Devices":
        index = np.asarray(index, dtype=int)
        arrays = {f.name: getattr(self, f.name)[index] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        counts = None if self.class_counts is None else tuple(self.class_counts[i] for i in index)
        return Devices(ids=tuple(self.ids[i] for i in index), class_counts=counts, **arrays)

    def with_bits(self, bits) -> "Devices":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["bits"] = np.broadcast_to(np.asarray(bits, dtype=int), (len(self),)).copy()
        return Devices(**values)


@dataclass(frozen=True)
class Scenario:
    system: System
    devices: Devices

    def subset(self, index) -> "Scenario":
        return Scenario(self.system, self.devices.subset(index))

    def to_json(self) -> dict:
        devices = []
        for k, dev_id in enumerate(self.devices.ids):
            d = {"id": dev_id, "d_loc": float(self.devices.d_loc[k]), "f_max_hz": float(self.devices.f_max[k]),
                 "eps": float(self.devices.eps[k]), "p_max_w": float(self.devices.p_max[k]),
                 "gain": float(self.devices.gain[k]), "bits": int(self.devices.bits[k])}
            if not np.isnan(self.devices.quant_error[k]):
                d["quant_error"] = float(self.devices.quant_error[k])
            if not np.isnan(self.devices.codec_constant[k]):
                d["codec_constant"] = float(self.devices.codec_constant[k])
            if self.devices.class_counts is not None:
                d["class_counts"] = [int(c) for c in self.devices.class_counts[k]]
            devices.append(d)
        return {"system": asdict(self.system), "devices": devices}


def _shown(value) -> str:
    """A value as an error message quotes it: a hostile file's megabyte string is cut short."""
    if isinstance(value, int) and abs(value) >= 10**30:  # (repr fails beyond 4,300 digits)
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4,000'} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _ranged(value, where: str, rule) -> float:
    positive, (low, high) = rule
    x = _number(value, where, positive)
    if not low <= x <= high:
        raise ScenarioError(f"{where} must be in [{low:g}, {high:g}], got {_shown(value)}")
    return x


def _number(value, where: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where} must be a number, got {_shown(value)}")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range (JSON allows any number of digits)
        x = math.inf
    if not math.isfinite(x):
        raise ScenarioError(f"{where} must be finite, got {_shown(value)}")
    if x < 0 or (positive and x == 0):
        raise ScenarioError(f"{where} must be {'positive' if positive else 'non-negative'}, got {_shown(value)}")
    return x


def system_range(name: str) -> tuple[float, float]:
    """The range a system field must lie in: a run setting that becomes it is checked against it."""
    return _SYSTEM_RULES[name][1]


def check_device_profile(profile: dict) -> None:
    """A node's reported figures in the planner's ranges, or ScenarioError naming the field:
    checked when the node reports them, so a node the planner would refuse sits out instead
    of stopping a round's planning."""
    for name, rule in _DEVICE_RULES.items():
        if name in profile:
            _ranged(profile[name], f"profile field '{name}'", rule)


def _check_demand(q: float, where: str) -> float:
    """A relative error demand lies in (0, 1): 0 asks for no error at all, 1 tolerates sending nothing."""
    if not 0 < q < 1:
        raise ScenarioError(f"{where} must be in (0, 1) (a relative error demand), got {q!r}")
    return q


def parse_scenario(data) -> Scenario:
    """Check and convert a scenario dict (the JSON contract) into arrays."""
    if not isinstance(data, dict):
        raise ScenarioError("scenario must be a JSON object with 'system' and 'devices'")
    system_data = data.get("system")
    if not isinstance(system_data, dict):
        raise ScenarioError("missing object 'system'")
    values = {}
    for name, rule in _SYSTEM_RULES.items():
        if name not in system_data:
            raise ScenarioError(f"system: missing field '{name}'")
        values[name] = _ranged(system_data[name], f"system.{name}", rule)
    if values["delta_max"] >= 1:
        raise ScenarioError(f"system.delta_max must be below 1, got {values['delta_max']}")
    power = 3.0 / values["beta"] * math.log10(values["alpha"])
    if abs(power) > MAX_LOG10_POWER:
        raise ScenarioError(f"system.alpha and system.beta: alpha^(3/beta) = 10^{power:.4g} is out of float range "
                            f"(at most 10^{MAX_LOG10_POWER}); the learning model's fit is not one of this scale")
    system = System(**values)

    devices_data = data.get("devices")
    if not isinstance(devices_data, list) or not devices_data:
        raise ScenarioError("'devices' must be a non-empty list")
    columns: dict[str, list] = {name: [] for name in _DEVICE_RULES}
    ids, bits, quant_error, codec_constant, class_counts = [], [], [], [], []
    seen = set()  # the ids so far: a list lookup made 20,000 devices take seconds
    for k, dev in enumerate(devices_data):
        if not isinstance(dev, dict):
            raise ScenarioError(f"devices[{k}] must be an object")
        if "id" not in dev:
            raise ScenarioError(f"devices[{k}]: missing field 'id'")
        if isinstance(dev["id"], int) and abs(dev["id"]) >= 10**30:
            raise ScenarioError(f"devices[{k}]: field 'id' is {_shown(dev['id'])}, not a name")
        dev_id = str(dev["id"])
        where = f"device '{dev_id if len(dev_id) <= 40 else dev_id[:37] + '...'}'"
        if dev_id in seen:
            raise ScenarioError(f"{where}: duplicate id")
        seen.add(dev_id)
        ids.append(dev_id)
        for name, rule in _DEVICE_RULES.items():
            if name not in dev:
                raise ScenarioError(f"{where}: missing field '{name}'")
            columns[name].append(_ranged(dev[name], f"{where}: field '{name}'", rule))
        b = dev.get("bits", 32)
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32:
            raise ScenarioError(f"{where}: field 'bits' must be an integer from 1 to 32, got {_shown(b)}")
        bits.append(b)
        q = dev.get("quant_error")
        quant_error.append(math.nan if q is None else
                           _check_demand(_number(q, f"{where}: field 'quant_error'", True), f"{where}: field 'quant_error'"))
        c = dev.get("codec_constant")
        codec_constant.append(math.nan if c is None else _number(c, f"{where}: field 'codec_constant'", True))
        counts = dev.get("class_counts")
        if counts is not None:
            if not isinstance(counts, list) or not counts:
                raise ScenarioError(f"{where}: field 'class_counts' must be a non-empty list")
            values = [_number(c, f"{where}: field 'class_counts'", False) for c in counts]
            if any(c != round(c) for c in values):
                raise ScenarioError(f"{where}: field 'class_counts' must hold whole numbers")
            total = sum(values)  # Python floats: a sum beyond float range is inf, with no numpy warning
            if total != columns["d_loc"][-1]:
                raise ScenarioError(f"{where}: class_counts sum to {total:g} but d_loc is {columns['d_loc'][-1]:g}")
        class_counts.append(counts)
    given = [c is not None for c in class_counts]
    if any(given) and not all(given):
        missing = ids[given.index(False)]
        raise ScenarioError(f"device '{missing}': field 'class_counts' is missing (give it for all devices or none)")
    if all(given) and len({len(c) for c in class_counts}) != 1:
        raise ScenarioError("field 'class_counts' must list the same number of classes for every device")
    devices = Devices(
        ids=tuple(ids), d_loc=np.array(columns["d_loc"]), f_max=np.array(columns["f_max_hz"]),
        eps=np.array(columns["eps"]), p_max=np.array(columns["p_max_w"]), gain=np.array(columns["gain"]),
        bits=np.array(bits, dtype=int), quant_error=np.array(quant_error),
        class_counts=tuple(np.array(c, dtype=np.int64) for c in class_counts) if all(given) else None,
        codec_constant=np.array(codec_constant),
    )
    return Scenario(system, devices)


def load_scenario(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ScenarioError(f"cannot read scenario {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ScenarioError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    return parse_scenario_text(text, str(path))


def parse_scenario_text(text: str, source: str = "scenario") -> Scenario:
    """`parse_scenario` of a JSON text; every way the text can be broken is a ScenarioError
    (JSON's own errors, nesting too deep for the parser, a number of more digits than Python
    converts)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScenarioError(f"{source} is not valid JSON: {err}") from None
    except RecursionError:
        raise ScenarioError(f"{source} is not usable JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer literal beyond Python's digit limit
        raise ScenarioError(f"{source} is not usable JSON: {_shown(str(err))}") from None
    return parse_scenario(data)
