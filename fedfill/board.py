"""What a node learns from its own board: its profile (cores, CPU frequency, memory, GPU, power
rails) read from sysfs, and the energy it really spends while training, measured by the board's
power sensors beside the cost model's figure.

Every read goes under a root directory: `/` on the board itself, or a copy of a board's `sys/`
and `proc/meminfo` (tests, containers). Sensors come in three layouts:

- NVIDIA Jetson, JetPack 5/6 (Orin): INA3221 chips under the hwmon driver, `in<N>_label`,
  `in<N>_input` (bus voltage, mV) and `curr<N>_input` (mA) for channels 1-3;
- NVIDIA Jetson, JetPack 4 (Nano, TX2): the older `ina3221x` IIO driver, `rail_name_<N>` and
  `in_power<N>_input` (mW);
- x86 (and AMD on recent kernels): RAPL, cumulative `energy_uj` counters under
  `sys/class/powercap/intel-rapl:*` that wrap at `max_energy_range_uj`.

Sensor files misbehave on real boards (RAPL counters are root-only since the 2020 Platypus fix,
drivers come and go): a file that cannot be read as a number skips its rail with a warning
(logged and kept in `warnings`), never an exception, and no figure is ever invented for it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# A rail that measures the whole board's input, used as its total instead of summing the rails:
# Orin NX/Nano (VDD_IN), Nano/TX2 on JetPack 4 (POM_5V_IN, VDD_IN), RAPL's platform zone (psys).
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "psys")
NOT_CONNECTED = "NC"  # the label of an INA3221 channel wired to nothing
INA_CHANNELS = (1, 2, 3)  # hwmon's channel 7 (and curr 4) is the chip's sum of these: never counted
I2C_ADDRESS = re.compile(r"\d+-[0-9a-fA-F]{4}")  # a chip's directory under its driver (1-0040), not bind/uevent
GPU_DEVFREQ = re.compile(r"gpu|ga10b|gv11b|gp10b")  # Jetson's integrated GPUs: 17000000.ga10b, 57000000.gpu


class SensorError(Exception):
    """A sensor file that could not be read as expected; the message says which and why."""


@dataclass
class BoardProfile:
    """This board as sysfs shows it. None means "not found here", never a guess.

    The cost model's energy coefficient eps, the radio's transmit power and the channel gain are
    NOT measured here: they stay configured or drawn. `power_w` is the board's electrical draw at
    the moment it was read, not the transmit power p_max_w.
    """

    f_max_hz: float | None
    cores: int | None
    memory_bytes: int | None
    gpu: str | None
    rails: dict[str, float]
    power_w: float | None
    energy_counter: str | None  # "rapl", "ina3221" or None: what EnergyMeter can measure here
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """Every field, None as null: what `fedfill board profile --json` prints."""
        return asdict(self)

    def profile_fields(self) -> dict:
        """The flat, not-None scalar fields a node adds to its device profile (a Flower
        ConfigRecord holds neither None nor dicts, hence no rails and no warnings)."""
        scalars = ("f_max_hz", "cores", "memory_bytes", "gpu", "power_w", "energy_counter")
        return {name: getattr(self, name) for name in scalars if getattr(self, name) is not None}


@dataclass(frozen=True)
class EnergyReading:
    joules: float | None  # None: no sensor, or one that failed; never an estimate
    seconds: float
    source: str | None  # "rapl", "ina3221" or None


# ---------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    """The one place sysfs is read: every way a read can fail becomes a SensorError."""
    try:
        return path.read_text().strip()
    except PermissionError:
        raise SensorError(f"{path}: permission denied") from None
    except FileNotFoundError:
        raise SensorError(f"{path}: missing") from None
    except IsADirectoryError:
        raise SensorError(f"{path}: a directory, not a file") from None
    except (OSError, ValueError) as err:  # EIO from a driver, undecodable bytes
        raise SensorError(f"{path}: {err}") from None


def _read_number(path: Path) -> float:
    text = _read_text(path)
    if not text:
        raise SensorError(f"{path}: empty")
    try:
        return float(text)
    except ValueError:
        raise SensorError(f"{path}: not a number: {text[:40]!r}") from None


def _warn(warnings: list[str], message: str, level: int = logging.WARNING) -> None:
    """Keep a skipped file's reason for the caller and log it (expected skips at debug level)."""
    warnings.append(message)
    log.log(level, message)


# ---------------------------------------------------------------- CPU, memory, GPU


def count_cpu_list(text: str) -> int:
    """How many CPUs a kernel CPU list names: "0-3,6,8-9" -> 7."""
    count = 0
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(f"not a CPU list: {text!r}")
        first, last = int(match[1]), int(match[2] if match[2] else match[1])
        if last < first:
            raise ValueError(f"not a CPU list: {text!r}")
        count += last - first + 1
    return count


def _cpu_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sys/devices/system/cpu").glob("cpu*") if re.fullmatch(r"cpu\d+", p.name))


def _cores(root: Path, warnings: list[str]) -> int | None:
    """The CPUs online now (the `online` list: a Jetson power mode takes cores offline), or,
    where that file is unreadable, the number of cpuN directories."""
    online = root / "sys/devices/system/cpu/online"
    try:
        return count_cpu_list(_read_text(online))
    except (SensorError, ValueError) as err:
        _warn(warnings, f"{err}; counting cpuN directories instead")
    return len(_cpu_dirs(root)) or None


def _f_max_hz(root: Path, warnings: list[str]) -> float | None:
    """The fastest CPU's cpuinfo_max_freq (kHz) in Hz; None where there is no cpufreq."""
    found = []
    for cpu in _cpu_dirs(root):
        if not (cpu / "cpufreq").exists():
            continue
        try:
            found.append(_read_number(cpu / "cpufreq/cpuinfo_max_freq") * 1e3)
        except SensorError as err:
            _warn(warnings, f"{err}; {cpu.name} skipped")
    if not found:
        _warn(warnings, "no cpufreq under sys/devices/system/cpu: f_max unknown", logging.INFO)
        return None
    return max(found)


def _memory_bytes(root: Path, warnings: list[str]) -> int | None:
    path = root / "proc/meminfo"
    try:
        text = _read_text(path)
    except SensorError as err:
        _warn(warnings, f"{err}; memory unknown")
        return None
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    if not match:
        _warn(warnings, f"{path}: no MemTotal line; memory unknown")
        return None
    return int(match[1]) * 1024


def _gpu(root: Path) -> str | None:
    """A Jetson's integrated GPU by its devfreq device name (17000000.ga10b), or gpu.0 where
    there is no devfreq entry; "nvidia" where the discrete NVIDIA driver is loaded."""
    for device in sorted((root / "sys/class/devfreq").glob("*")):
        if GPU_DEVFREQ.search(device.name):
            return device.name
    if (root / "sys/devices/gpu.0").exists():
        return "gpu.0"
    if (root / "sys/module/nvidia").exists():
        return "nvidia"
    return None


# ---------------------------------------------------------------- power sensors


@dataclass(frozen=True)
class _Channel:
    """One INA3221 rail: its watts are the product of its files' numbers over `divisor`
    (hwmon: mV x mA / 1e6; the JetPack 4 IIO driver: mW / 1e3)."""

    name: str
    files: tuple[Path, ...]
    divisor: float

    def watts(self) -> float:
        product = 1.0
        for path in self.files:
            product *= _read_number(path)
        return product / self.divisor


@dataclass(frozen=True)
class _RaplZone:
    name: str  # "package-0"; a subzone is qualified by its package: "package-0/core"
    energy_file: Path
    max_range_uj: float | None
    top_level: bool  # only top-level zones count toward the total: a subzone lies inside its package


@dataclass
class _Sensors:
    kind: str | None  # "rapl", "ina3221" or None
    channels: list[_Channel]
    zones: list[_RaplZone]
    total: list[str]  # the rails (or top-level zones) that sum to the board's total


def _chips(root: Path, driver: str) -> list[Path]:
    return sorted(p for p in (root / "sys/bus/i2c/drivers" / driver).glob("*") if I2C_ADDRESS.fullmatch(p.name))


def _channel_number(path: Path, pattern: str) -> int:
    return int(re.fullmatch(pattern, path.name)[1])


def _labelled(label_file: Path, chip: Path, number: int, warnings: list[str]) -> str | None:
    """The rail name a label file gives, or None (with the reason) for a channel to skip."""
    try:
        label = _read_text(label_file)
    except SensorError as err:
        _warn(warnings, f"{err}; {chip.name} channel {number} skipped")
        return None
    if label == NOT_CONNECTED:
        _warn(warnings, f"{chip.name} channel {number}: labelled NC (not connected), skipped", logging.DEBUG)
        return None
    if not label:
        _warn(warnings, f"{label_file}: empty; {chip.name} channel {number} skipped")
        return None
    return label


def _ina_channels(root: Path, warnings: list[str]) -> list[_Channel]:
    """The labelled, connected rails of every INA3221 chip, hwmon (JetPack 5/6) and IIO (JetPack 4)."""
    channels = []
    for chip in _chips(root, "ina3221"):
        hwmons = sorted((chip / "hwmon").glob("hwmon*"))
        if not hwmons:
            _warn(warnings, f"{chip}: no hwmon directory; its rails skipped")
            continue
        for label_file in sorted(hwmons[0].glob("in*_label"), key=lambda p: _channel_number(p, r"in(\d+)_label")):
            number = _channel_number(label_file, r"in(\d+)_label")
            if number not in INA_CHANNELS:
                _warn(warnings, f"{chip.name} channel {number}: the sum of channels 1-3, skipped", logging.DEBUG)
                continue
            name = _labelled(label_file, chip, number, warnings)
            if name:
                files = (hwmons[0] / f"in{number}_input", hwmons[0] / f"curr{number}_input")
                channels.append(_Channel(name, files, 1e6))
    for chip in _chips(root, "ina3221x"):
        devices = sorted(chip.glob("iio:device*"))
        if not devices:
            _warn(warnings, f"{chip}: no iio:device directory; its rails skipped")
            continue
        for name_file in sorted(devices[0].glob("rail_name_*"), key=lambda p: _channel_number(p, r"rail_name_(\d+)")):
            number = _channel_number(name_file, r"rail_name_(\d+)")
            name = _labelled(name_file, chip, number, warnings)
            if name:
                channels.append(_Channel(name, (devices[0] / f"in_power{number}_input",), 1e3))
    unique = {}
    for channel in channels:
        if channel.name in unique:
            _warn(warnings, f"rail {channel.name} found twice; the second ({channel.files[0].parent}) skipped")
        else:
            unique[channel.name] = channel
    return list(unique.values())


def _rapl_zones(root: Path, warnings: list[str]) -> list[_RaplZone]:
    """RAPL zones `intel-rapl:N` (packages, psys) and subzones `intel-rapl:N:M` (core, dram...)."""
    found = {}
    for zone in sorted((root / "sys/class/powercap").glob("intel-rapl:*")):
        try:
            found[zone.name] = _read_text(zone / "name")
        except SensorError as err:
            _warn(warnings, f"{err}; RAPL zone {zone.name} skipped")
    zones = []
    for zone_id, name in found.items():
        parts = zone_id.split(":")[1:]
        top_level = len(parts) == 1
        if not top_level:
            name = f"{found.get('intel-rapl:' + parts[0], 'intel-rapl:' + parts[0])}/{name}"
        directory = root / "sys/class/powercap" / zone_id
        try:
            max_range = _read_number(directory / "max_energy_range_uj")
        except SensorError as err:
            _warn(warnings, f"{err}; a wrap of {name}'s counter cannot be undone")
            max_range = None
        zones.append(_RaplZone(name, directory / "energy_uj", max_range, top_level))
    return zones


def _total_members(names: list[str]) -> list[str]:
    """The board's total: a rail that measures its whole input where there is one, else all."""
    whole = [name for name in names if name in TOTAL_RAILS]
    return whole[:1] if whole else names


def _find_sensors(root: Path, warnings: list[str]) -> _Sensors:
    """RAPL where the powercap zones exist, else the INA3221 rails, else nothing."""
    zones = _rapl_zones(root, warnings)
    packages = [z.name for z in zones if z.top_level]
    if packages:
        return _Sensors("rapl", [], zones, _total_members(packages))
    if zones:
        _warn(warnings, "RAPL subzones without their package: not counted")
    channels = _ina_channels(root, warnings)
    if channels:
        return _Sensors("ina3221", channels, [], _total_members([c.name for c in channels]))
    return _Sensors(None, [], [], [])


def _read_counters(zones: list[_RaplZone], warnings: list[str]) -> dict[str, float]:
    """Each readable zone's counter in µJ; an unreadable one is left out with a warning."""
    counters = {}
    for zone in zones:
        try:
            counters[zone.name] = _read_number(zone.energy_file)
        except SensorError as err:
            hint = " (RAPL counters are root-only since Linux's 2020 Platypus fix)" if "permission" in str(err) else ""
            _warn(warnings, f"{err}{hint}; RAPL zone {zone.name} skipped")
    return counters


def counter_delta_uj(before: float, after: float, max_range_uj: float | None) -> float:
    """µJ between two readings of a RAPL counter that wrapped at most once."""
    if after >= before:
        return after - before
    if max_range_uj is None:
        raise SensorError("the RAPL counter went backwards and its max_energy_range_uj is unknown")
    return max_range_uj - before + after


def _total_watts(sensors: _Sensors) -> float:
    """The INA3221 total now (the same rule as BoardProfile.power_w); SensorError if a member fails."""
    return sum(c.watts() for c in sensors.channels if c.name in sensors.total)


# ---------------------------------------------------------------- the profile


def read_board(root: str | Path = "/", *, power_interval_s: float = 0.2) -> BoardProfile:
    """Read this board's profile under `root`. RAPL's watts come from two counter readings
    `power_interval_s` apart; INA3221's are read directly.

    `power_w` is the whole-input rail (VDD_IN, POM_5V_IN, RAPL's psys) where one exists, else
    the sum of the rails (RAPL: of the top-level zones); None when any rail of that total could
    not be read (a partial sum would understate the board) or where there are no sensors.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    warnings: list[str] = []
    profile = BoardProfile(f_max_hz=_f_max_hz(root, warnings), cores=_cores(root, warnings),
                           memory_bytes=_memory_bytes(root, warnings), gpu=_gpu(root), rails={},
                           power_w=None, energy_counter=None, warnings=warnings)
    sensors = _find_sensors(root, warnings)
    if sensors.kind == "rapl":
        profile.rails = _rapl_watts(sensors.zones, power_interval_s, warnings)
    elif sensors.kind == "ina3221":
        for channel in sensors.channels:
            try:
                profile.rails[channel.name] = channel.watts()
            except SensorError as err:
                _warn(warnings, f"{err}; rail {channel.name} skipped")
    if sensors.kind:
        missing = [name for name in sensors.total if name not in profile.rails]
        if missing:
            _warn(warnings, f"board power unknown: {', '.join(missing)} could not be read")
        else:
            profile.power_w = sum(profile.rails[name] for name in sensors.total)
            profile.energy_counter = sensors.kind
    return profile


def _rapl_watts(zones: list[_RaplZone], interval_s: float, warnings: list[str]) -> dict[str, float]:
    first = _read_counters(zones, warnings)
    started = time.monotonic()
    time.sleep(interval_s)
    second = _read_counters([z for z in zones if z.name in first], warnings)
    seconds = time.monotonic() - started
    watts = {}
    for zone in zones:
        if zone.name in second:
            try:
                watts[zone.name] = counter_delta_uj(first[zone.name], second[zone.name], zone.max_range_uj) / 1e6 / seconds
            except SensorError as err:
                _warn(warnings, f"{zone.energy_file}: {err}; RAPL zone {zone.name} skipped")
    return watts


# ---------------------------------------------------------------- measuring energy


class EnergyMeter:
    """The energy the board spends between start() and stop(), measured by its sensors.

    RAPL: the difference of the top-level zones' counters (psys alone where it exists), one wrap
    per zone undone; a window longer than a counter's wrap period (max_energy_range_uj over the
    power: tens of minutes at 100 W) would be undercounted. INA3221: a daemon thread samples the
    board's total power every `interval_s` (and once at start and at stop) and integrates it with
    the trapezoid rule; a failed sample in the middle is bridged, a failed first or last sample
    gives None. No sensors: joules None, seconds still measured. A misbehaving sensor never
    raises here: the reading says None and `warnings` says why.

        with EnergyMeter() as meter:
            train()
        meter.reading.joules
    """

    def __init__(self, root: str | Path = "/", interval_s: float = 0.05):
        self.root = Path(root)
        self.interval_s = interval_s
        self.warnings: list[str] = []
        self.reading: EnergyReading | None = None
        self._running = False

    def start(self) -> EnergyMeter:
        if self._running:
            raise RuntimeError("this EnergyMeter is already measuring")
        self._running = True
        self.warnings = []
        self.reading = None
        # Sensors are looked up at every start: a driver may have come or gone since the last one.
        self._sensors = _find_sensors(self.root, self.warnings)
        self._started = time.monotonic()
        self._thread = None
        if self._sensors.kind == "rapl":
            self._members = [z for z in self._sensors.zones if z.name in self._sensors.total]
            self._counters = _read_counters(self._members, self.warnings)
        elif self._sensors.kind == "ina3221":
            self._joules, self._last = 0.0, None
            self._first_ok = self._sample()
            self._started = self._last[0] if self._last else self._started
            self._stopping = threading.Event()
            self._thread = threading.Thread(target=self._sample_until_stopped, name="fedfill-energy-meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> EnergyReading:
        if not self._running:
            raise RuntimeError("this EnergyMeter was not started")
        self._running = False
        kind, joules = self._sensors.kind, None
        if kind == "rapl":
            ended = time.monotonic()
            joules = self._rapl_joules()
        elif kind == "ina3221":
            self._stopping.set()
            self._thread.join()
            last_ok = self._sample()
            ended = self._last[0] if last_ok else time.monotonic()
            if self._first_ok and last_ok:
                joules = self._joules
            else:
                _warn(self.warnings, f"board power not read at {'start' if not self._first_ok else 'stop'}: energy unknown")
        else:
            ended = time.monotonic()
        self.reading = EnergyReading(joules, ended - self._started, kind)
        return self.reading

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _rapl_joules(self) -> float | None:
        after = _read_counters(self._members, self.warnings)
        if len(self._counters) < len(self._members) or len(after) < len(self._members):
            return None
        try:
            return sum(counter_delta_uj(self._counters[z.name], after[z.name], z.max_range_uj)
                       for z in self._members) / 1e6
        except SensorError as err:
            _warn(self.warnings, f"{err}; energy unknown")
            return None

    def _sample(self) -> bool:
        """Read the total power once and add the trapezoid since the last good sample."""
        now = time.monotonic()
        try:
            watts = _total_watts(self._sensors)
        except SensorError as err:
            if str(err) not in self.warnings:  # a sensor failing every 50 ms says so once
                _warn(self.warnings, str(err))
            return False
        if self._last is not None:
            self._joules += (now - self._last[0]) * (self._last[1] + watts) / 2
        self._last = (now, watts)
        return True

    def _sample_until_stopped(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._sample()
