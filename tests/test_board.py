"""fedfill.board on copies of real boards' sysfs trees (tests/board_trees.py): the profile,
the power rule, bad sensor files, the energy meter, and `fedfill board profile`."""

from __future__ import annotations

import json
import os
import logging
import threading
import time
from pathlib import Path

import pytest

from fedfill import board
from fedfill.board import EnergyMeter, count_cpu_list, counter_delta_uj, read_board
from fedfill.cli import main
from tests.board_trees import (EXPECTED, KINDS, RAPL_MAX_RANGE_UJ, RAPL_START_UJ, hwmon_dir, rapl_energy_file,
                               set_rapl_energy, write_tree)

FIELDS = ("f_max_hz", "cores", "memory_bytes", "gpu", "rails", "power_w", "energy_counter", "warnings")


class FakeClock:
    """Stands in for the `time` module inside fedfill.board: sleeping advances the clock at
    once and first runs `on_sleep` (a test moving the counters in the meantime)."""

    def __init__(self, on_sleep=lambda: None):
        self.now, self.on_sleep = 100.0, on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.on_sleep()
        self.now += seconds


def replace_file(path: Path, text: str) -> None:
    """Swap a file's content at once, as a sampling thread may read it at any moment."""
    spare = path.with_name(path.name + ".new")
    spare.write_text(text)
    os.replace(spare, path)


def meter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fedfill-energy-meter"]


# ---------------------------------------------------------------- profiles


@pytest.mark.parametrize("kind", KINDS)
def test_each_board_reads_as_its_real_figures(kind, tmp_path):
    profile = read_board(write_tree(kind, tmp_path), power_interval_s=0.01)
    expected = EXPECTED[kind]
    assert profile.cores == expected["cores"]
    assert profile.f_max_hz == expected["f_max_hz"]
    assert profile.memory_bytes == expected["memory_bytes"]
    assert profile.gpu == expected["gpu"]
    assert profile.rails == pytest.approx(expected["rails"])
    if expected["power_w"] is None:
        assert profile.power_w is None
    else:
        assert profile.power_w == pytest.approx(expected["power_w"])
    assert profile.energy_counter == expected["energy_counter"]
    assert not [w for w in profile.warnings if "skipped" in w and "channel" not in w], profile.warnings


def test_the_total_is_the_input_rail_where_there_is_one_else_the_sum(tmp_path):
    orin = read_board(write_tree("orin-nx", tmp_path / "orin"))
    assert orin.power_w == orin.rails["VDD_IN"] and orin.power_w < sum(orin.rails.values())
    nano = read_board(write_tree("nano-jp4", tmp_path / "nano"))
    assert nano.power_w == nano.rails["POM_5V_IN"]
    agx = read_board(write_tree("agx-orin", tmp_path / "agx"))
    assert "VDD_IN" not in agx.rails and agx.power_w == pytest.approx(sum(agx.rails.values()))
    assert read_board(write_tree("bare", tmp_path / "bare")).power_w is None


def test_nc_channels_and_the_sum_channel_are_not_rails(tmp_path):
    profile = read_board(write_tree("agx-orin", tmp_path))
    assert set(profile.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert "1-0041 channel 1: labelled NC (not connected), skipped" in profile.warnings
    assert "1-0041 channel 3: labelled NC (not connected), skipped" in profile.warnings
    assert "1-0040 channel 7: the sum of channels 1-3, skipped" in profile.warnings


def test_profile_fields_are_flat_and_never_none(tmp_path):
    orin = read_board(write_tree("orin-nx", tmp_path / "orin")).profile_fields()
    assert orin == {"f_max_hz": 1_984_000_000.0, "cores": 8, "memory_bytes": EXPECTED["orin-nx"]["memory_bytes"],
                    "gpu": "17000000.ga10b", "power_w": pytest.approx(6.0), "energy_counter": "ina3221"}
    bare = read_board(write_tree("bare", tmp_path / "bare")).profile_fields()
    assert bare == {"cores": 2, "memory_bytes": EXPECTED["bare"]["memory_bytes"]}


def test_to_json_has_every_field_with_null_for_unknown(tmp_path):
    data = json.loads(json.dumps(read_board(write_tree("bare", tmp_path)).to_json()))
    assert set(data) == set(FIELDS)
    assert data["f_max_hz"] is None and data["power_w"] is None and data["rails"] == {}
    assert "no cpufreq under sys/devices/system/cpu: f_max unknown" in data["warnings"]


def test_rapl_power_is_the_counters_difference_over_the_interval_across_a_wrap(tmp_path, monkeypatch):
    root = write_tree("x86-rapl", tmp_path)
    set_rapl_energy(root, "intel-rapl:0", RAPL_MAX_RANGE_UJ - 1_000_000)

    def twenty_joules_later():  # 1 J before the wrap, 19 J after
        set_rapl_energy(root, "intel-rapl:0", 19_000_000)
        set_rapl_energy(root, "intel-rapl:0:0", RAPL_START_UJ + 8_000_000)

    monkeypatch.setattr(board, "time", FakeClock(twenty_joules_later))
    profile = read_board(root, power_interval_s=2.0)
    assert profile.rails == pytest.approx({"package-0": 10.0, "package-0/core": 4.0, "package-0/dram": 0.0})
    assert profile.power_w == pytest.approx(10.0)  # the package; its core subzone lies inside it


def test_rapl_psys_is_the_whole_platform(tmp_path, monkeypatch):
    root = write_tree("x86-rapl", tmp_path)
    psys = root / "sys/class/powercap/intel-rapl:1"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "max_energy_range_uj").write_text(f"{RAPL_MAX_RANGE_UJ}\n")
    set_rapl_energy(root, "intel-rapl:1", 0)
    monkeypatch.setattr(board, "time", FakeClock(lambda: (set_rapl_energy(root, "intel-rapl:1", 30_000_000),
                                                           set_rapl_energy(root, "intel-rapl:0", RAPL_START_UJ + 20_000_000))))
    profile = read_board(root, power_interval_s=1.0)
    assert profile.rails["package-0"] == pytest.approx(20.0)
    assert profile.power_w == pytest.approx(30.0)


def test_cpu_lists_and_the_fallback_to_cpu_directories(tmp_path):
    assert count_cpu_list("0-3,6,8-9") == 7 and count_cpu_list("0") == 1
    with pytest.raises(ValueError):
        count_cpu_list("0-a")
    root = write_tree("orin-nx", tmp_path)
    (root / "sys/devices/system/cpu/online").write_text("0-3\n")  # a power mode with four cores off
    assert read_board(root).cores == 4
    (root / "sys/devices/system/cpu/online").unlink()
    profile = read_board(root)
    assert profile.cores == 8 and any("online: missing" in w for w in profile.warnings)


def test_counter_delta_undoes_one_wrap():
    assert counter_delta_uj(100, 250, 1000) == 150
    assert counter_delta_uj(900, 50, 1000) == 150
    with pytest.raises(board.SensorError):
        counter_delta_uj(900, 50, None)


# ---------------------------------------------------------------- bad sensor files


@pytest.mark.parametrize("content, reason", [("abc\n", "not a number: 'abc'"), ("", "empty")])
def test_an_odd_rail_file_skips_that_rail_with_a_warning(tmp_path, caplog, content, reason):
    root = write_tree("orin-nx", tmp_path)
    (hwmon_dir(root, "1-0040") / "curr2_input").write_text(content)
    with caplog.at_level(logging.WARNING, logger="fedfill.board"):
        profile = read_board(root)
    assert set(profile.rails) == {"VDD_IN", "VDD_SOC"}
    assert profile.power_w == pytest.approx(6.0)  # VDD_IN alone is the total: still known
    message = next(w for w in profile.warnings if "VDD_CPU_GPU_CV" in w)
    assert reason in message and "curr2_input" in message
    assert message in caplog.messages


def test_an_unreadable_member_of_the_total_leaves_the_total_unknown(tmp_path):
    root = write_tree("agx-orin", tmp_path)
    (hwmon_dir(root, "1-0041") / "in2_input").unlink()
    profile = read_board(root)
    assert "VDDQ_VDD2_1V8AO" not in profile.rails and len(profile.rails) == 3
    assert profile.power_w is None and profile.energy_counter is None  # a partial sum would understate the board
    assert any("in2_input: missing" in w for w in profile.warnings)
    assert "board power unknown: VDDQ_VDD2_1V8AO could not be read" in profile.warnings


def test_a_missing_hwmon_index_skips_that_chip(tmp_path):
    root = write_tree("agx-orin", tmp_path)
    hwmon = hwmon_dir(root, "1-0041")
    for path in sorted(hwmon.iterdir()):
        path.unlink()
    hwmon.rmdir()
    profile = read_board(root)
    assert set(profile.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}
    assert profile.power_w == pytest.approx(9.5)  # the sum of the rails this board has
    assert any("1-0041: no hwmon directory" in w for w in profile.warnings)


def test_a_directory_where_the_rapl_counter_should_be_skips_that_zone(tmp_path):
    root = write_tree("x86-rapl", tmp_path)
    counter = rapl_energy_file(root, "intel-rapl:0:1")
    counter.unlink()
    counter.mkdir()
    profile = read_board(root, power_interval_s=0.01)
    assert set(profile.rails) == {"package-0", "package-0/core"}
    assert profile.power_w == pytest.approx(0.0)
    assert any("a directory, not a file; RAPL zone package-0/dram skipped" in w for w in profile.warnings)


def test_rapl_counters_readable_by_root_only_leave_power_unknown(tmp_path, monkeypatch):
    """The real case since 2020: energy_uj is mode 0400. We run as root, so the denial comes
    from a stand-in for Path.read_text on those files only."""
    root = write_tree("x86-rapl", tmp_path)
    read_text = Path.read_text

    def denied_for_counters(path, *args, **kwargs):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied_for_counters)
    profile = read_board(root, power_interval_s=0.01)
    assert profile.rails == {} and profile.power_w is None and profile.energy_counter is None
    assert any("energy_uj: permission denied" in w and "root-only" in w for w in profile.warnings)
    reading = EnergyMeter(root).start().stop()
    assert reading.joules is None and reading.source == "rapl"


# ---------------------------------------------------------------- the energy meter


@pytest.mark.parametrize("kind", ["orin-nx", "agx-orin", "nano-jp4"])
def test_the_meter_integrates_static_ina_power_to_power_times_time(kind, tmp_path):
    meter = EnergyMeter(write_tree(kind, tmp_path), interval_s=0.01)
    with meter:
        time.sleep(0.15)
    reading = meter.reading
    assert reading.source == "ina3221" and reading.seconds >= 0.15
    assert reading.joules == pytest.approx(EXPECTED[kind]["power_w"] * reading.seconds, rel=1e-9)
    assert not meter_threads()


def test_the_meter_on_rapl_counts_the_packages_across_a_wrap(tmp_path):
    root = write_tree("x86-rapl", tmp_path)
    set_rapl_energy(root, "intel-rapl:0", RAPL_MAX_RANGE_UJ - 1_000_000)
    meter = EnergyMeter(root).start()
    set_rapl_energy(root, "intel-rapl:0", 2_000_000)
    set_rapl_energy(root, "intel-rapl:0:0", RAPL_START_UJ + 50_000_000)  # inside the package: not added
    reading = meter.stop()
    assert reading.source == "rapl" and reading.joules == pytest.approx(3.0) and reading.seconds >= 0


def test_the_meter_without_sensors_measures_time_only(tmp_path):
    meter = EnergyMeter(write_tree("bare", tmp_path), interval_s=0.01)
    meter.start()
    time.sleep(0.05)
    reading = meter.stop()
    assert reading.joules is None and reading.source is None and reading.seconds >= 0.05
    assert not meter_threads()


def test_a_sensor_failing_mid_run_is_bridged_and_said(tmp_path):
    root = write_tree("orin-nx", tmp_path)
    current = hwmon_dir(root, "1-0040") / "curr1_input"
    meter = EnergyMeter(root, interval_s=0.01).start()
    replace_file(current, "garbage\n")
    time.sleep(0.2)
    replace_file(current, "1200\n")
    reading = meter.stop()
    assert reading.joules == pytest.approx(6.0 * reading.seconds, rel=1e-9)
    assert any("not a number: 'garbage'" in w for w in meter.warnings)
    assert len([w for w in meter.warnings if "garbage" in w]) == 1  # said once, not every 10 ms


def test_a_sensor_gone_at_stop_gives_no_energy_and_no_exception(tmp_path):
    root = write_tree("nano-jp4", tmp_path)
    meter = EnergyMeter(root, interval_s=0.01).start()
    time.sleep(0.03)
    (root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input").unlink()
    reading = meter.stop()
    assert reading.joules is None and reading.source == "ina3221" and reading.seconds > 0
    assert "board power not read at stop: energy unknown" in meter.warnings
    assert not meter_threads()


def test_a_meter_measures_again_and_refuses_a_stop_without_a_start(tmp_path):
    meter = EnergyMeter(write_tree("orin-nx", tmp_path), interval_s=0.01)
    with pytest.raises(RuntimeError):
        meter.stop()
    first, second = meter.start().stop(), meter.start().stop()
    assert first.joules is not None and second.joules is not None and not meter_threads()


# ---------------------------------------------------------------- fedfill board profile


def test_board_profile_json_on_a_tree(tmp_path, capsys):
    root = write_tree("orin-nx", tmp_path)
    assert main(["board", "profile", "--sysfs-root", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(FIELDS)
    assert data["cores"] == 8 and data["power_w"] == pytest.approx(6.0) and data["gpu"] == "17000000.ga10b"


def test_board_profile_text_on_a_tree(tmp_path, capsys):
    assert main(["board", "profile", "--sysfs-root", str(write_tree("agx-orin", tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "12" in out and "2202 MHz" in out and "10.00 W (measured by ina3221)" in out and "VDD_CPU_CV 2.00 W" in out


def test_board_profile_of_a_missing_root_exits_2(tmp_path, capsys):
    assert main(["board", "profile", "--sysfs-root", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_board_profile_on_this_machine(capsys):
    assert main(["board", "profile"]) == 0
    assert "cores" in capsys.readouterr().out
    assert main(["board", "profile", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(FIELDS)
