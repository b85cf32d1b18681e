"""Copies of edge boards' sysfs trees (the files fedfill.board reads, with real paths and
figures) and what reading each should give, for tests and for containers that mount a tree.

    root = write_tree("orin-nx", tmp_path)      # root/sys/..., root/proc/meminfo
    read_board(root).power_w == EXPECTED["orin-nx"]["power_w"]

Sensor values are static and consistent (VDD_IN 5000 mV x 1200 mA = 6.0 W). Directories that
are symbolic links on a real board (sys/class/..., a driver's chip entries) are plain
directories here, so that a tree copies and mounts anywhere.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("orin-nx", "agx-orin", "nano-jp4", "x86-rapl", "bare")

# x86-rapl's RAPL zones: directory -> name; counters start at RAPL_START_UJ and never move
# unless a test rewrites them (set_rapl_energy), wrapping at RAPL_MAX_RANGE_UJ.
RAPL_ZONES = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core", "intel-rapl:0:1": "dram"}
RAPL_MAX_RANGE_UJ = 262_143_328_850
RAPL_START_UJ = 1_000_000_000

# INA3221 hwmon channels: chip -> [(channel, label, mV, mA)]; hwmon also has channel 7, the sum.
_ORIN_NX_INA = {"1-0040": [(1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 400), (3, "VDD_SOC", 5000, 300)]}
_AGX_ORIN_INA = {
    "1-0040": [(1, "VDD_GPU_SOC", 5000, 800), (2, "VDD_CPU_CV", 5000, 400), (3, "VIN_SYS_5V0", 5000, 700)],
    "1-0041": [(1, "NC", 0, 0), (2, "VDDQ_VDD2_1V8AO", 5000, 100), (3, "NC", 0, 0)],
}
# Jetson Nano, JetPack 4's ina3221x IIO driver: chip -> [(channel, rail, mV, mA, mW)]
_NANO_INA = {"6-0040": [(0, "POM_5V_IN", 5000, 1000, 5000), (1, "POM_5V_GPU", 5000, 100, 500),
                        (2, "POM_5V_CPU", 5000, 300, 1500)]}

# kind -> what read_board gives (rails and power in W at the static values above)
EXPECTED = {
    "orin-nx": {"cores": 8, "f_max_hz": 1_984_000_000.0, "memory_bytes": 15_662_832 * 1024,
                "gpu": "17000000.ga10b", "rails": {"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 2.0, "VDD_SOC": 1.5},
                "power_w": 6.0, "energy_counter": "ina3221"},
    "agx-orin": {"cores": 12, "f_max_hz": 2_201_600_000.0, "memory_bytes": 64_335_836 * 1024,
                 "gpu": "17000000.ga10b",
                 "rails": {"VDD_GPU_SOC": 4.0, "VDD_CPU_CV": 2.0, "VIN_SYS_5V0": 3.5, "VDDQ_VDD2_1V8AO": 0.5},
                 "power_w": 10.0, "energy_counter": "ina3221"},
    "nano-jp4": {"cores": 4, "f_max_hz": 1_479_000_000.0, "memory_bytes": 4_059_484 * 1024,
                 "gpu": "57000000.gpu", "rails": {"POM_5V_IN": 5.0, "POM_5V_GPU": 0.5, "POM_5V_CPU": 1.5},
                 "power_w": 5.0, "energy_counter": "ina3221"},
    "x86-rapl": {"cores": 8, "f_max_hz": 4_700_000_000.0, "memory_bytes": 32_768_000 * 1024, "gpu": "nvidia",
                 "rails": {"package-0": 0.0, "package-0/core": 0.0, "package-0/dram": 0.0},
                 "power_w": 0.0, "energy_counter": "rapl"},
    "bare": {"cores": 2, "f_max_hz": None, "memory_bytes": 2_048_000 * 1024, "gpu": None, "rails": {},
             "power_w": None, "energy_counter": None},
}

_DEVFREQ = {"orin-nx": ["15340000.vic", "15480000.nvdec", "17000000.ga10b"],
            "agx-orin": ["15340000.vic", "15480000.nvdec", "158c0000.nvdla1", "17000000.ga10b"],
            "nano-jp4": ["57000000.gpu"]}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _cpus(root: Path, cores: int, max_khz: int | None) -> None:
    cpu = root / "sys/devices/system/cpu"
    for n in range(cores):
        _write(cpu / f"cpu{n}/online", "1")
        if max_khz is not None:
            _write(cpu / f"cpu{n}/cpufreq/cpuinfo_max_freq", str(max_khz))
            _write(cpu / f"cpu{n}/cpufreq/cpuinfo_min_freq", "115200")
    _write(cpu / "online", f"0-{cores - 1}")
    _write(cpu / "present", f"0-{cores - 1}")
    (cpu / "cpufreq").mkdir(exist_ok=True)  # the policy directory exists even without a driver


def _meminfo(root: Path, kb: int) -> None:
    _write(root / "proc/meminfo", f"MemTotal:       {kb} kB\nMemFree:        {kb // 2} kB\n"
                                  f"MemAvailable:   {kb // 2 + 1000} kB")


def _ina_driver(root: Path, driver: str) -> Path:
    """A driver directory as the kernel shows it: bind, unbind, uevent beside the chips."""
    directory = root / "sys/bus/i2c/drivers" / driver
    for name in ("bind", "unbind", "uevent"):
        _write(directory / name, "")
    return directory


def hwmon_dir(root: Path, chip: str) -> Path:
    """An INA3221 chip's hwmon directory in a written tree (for tests that spoil a file)."""
    return root / "sys/bus/i2c/drivers/ina3221" / chip / "hwmon" / ("hwmon1" if chip.endswith("40") else "hwmon2")


def _ina_hwmon(root: Path, chips: dict) -> None:
    _ina_driver(root, "ina3221")
    for chip, channels in chips.items():
        hwmon = hwmon_dir(root, chip)
        _write(hwmon / "name", "ina3221")
        for number, label, millivolts, milliamps in channels:
            _write(hwmon / f"in{number}_label", label)
            _write(hwmon / f"in{number}_input", str(millivolts))
            _write(hwmon / f"in{number}_enable", "1")
            _write(hwmon / f"curr{number}_input", str(milliamps))
            _write(hwmon / f"in{number + 3}_input", str(milliamps // 20))  # shunt voltage, unlabelled
        # channel 7: the chip's sum of the shunt voltages (curr4: of the currents), never a rail
        _write(hwmon / "in7_label", "sum of shunt voltages")
        _write(hwmon / "in7_input", str(sum(c[3] for c in channels) // 20))
        _write(hwmon / "curr4_input", str(sum(c[3] for c in channels)))


def _ina_iio(root: Path, chips: dict) -> None:
    driver = _ina_driver(root, "ina3221x")
    for chip, channels in chips.items():
        device = driver / chip / "iio:device0"
        _write(device / "name", "ina3221x")
        for number, rail, millivolts, milliamps, milliwatts in channels:
            _write(device / f"rail_name_{number}", rail)
            _write(device / f"in_voltage{number}_input", str(millivolts))
            _write(device / f"in_current{number}_input", str(milliamps))
            _write(device / f"in_power{number}_input", str(milliwatts))


def rapl_energy_file(root: Path, zone: str) -> Path:
    return root / "sys/class/powercap" / zone / "energy_uj"


def set_rapl_energy(root: Path, zone: str, microjoules: int) -> None:
    """Move a RAPL counter of an x86-rapl tree (zone: "intel-rapl:0", ...)."""
    rapl_energy_file(root, zone).write_text(f"{microjoules}\n")


def _rapl(root: Path) -> None:
    powercap = root / "sys/class/powercap"
    _write(powercap / "intel-rapl/enabled", "1")  # the control type, not a zone
    for zone, name in RAPL_ZONES.items():
        _write(powercap / zone / "name", name)
        _write(powercap / zone / "enabled", "1")
        _write(powercap / zone / "max_energy_range_uj", str(RAPL_MAX_RANGE_UJ))
        set_rapl_energy(root, zone, RAPL_START_UJ)


def write_tree(kind: str, root: Path) -> Path:
    """Write board `kind`'s tree under `root` (made if missing) and return root."""
    if kind not in KINDS:
        raise ValueError(f"unknown board kind {kind!r}; one of {', '.join(KINDS)}")
    root = Path(root)
    expected = EXPECTED[kind]
    max_khz = None if expected["f_max_hz"] is None else int(expected["f_max_hz"] / 1e3)
    _cpus(root, expected["cores"], max_khz)
    _meminfo(root, expected["memory_bytes"] // 1024)
    for device in _DEVFREQ.get(kind, []):
        _write(root / "sys/class/devfreq" / device / "max_freq", "1020000000")
    if kind == "orin-nx":
        _ina_hwmon(root, _ORIN_NX_INA)
    elif kind == "agx-orin":
        _ina_hwmon(root, _AGX_ORIN_INA)
    elif kind == "nano-jp4":
        _ina_iio(root, _NANO_INA)
    elif kind == "x86-rapl":
        _rapl(root)
        _write(root / "sys/module/nvidia/version", "550.54.14")
    return root
