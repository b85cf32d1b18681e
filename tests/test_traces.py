"""Device traces and the virtual clock (issue 25 item 4): the trace model, `fedfill traces`
(synthetic fleets, FedScale's pickles converted and hostile ones refused), the pre-run checks,
and a real trace-driven `fedfill run` on Flower's simulation engine."""

import csv
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from commands.checks import check_traces
from fedfill.cli import main
from fedfill.errors import UsageError
from strategies.allocation.traces import (TraceError, from_fedscale, load_traces, parse_traces, read_plain_pickle,
                                          scaled_profile, synth_traces)
from strategies.allocation.costs import uplink_rate

ROOT = Path(__file__).resolve().parents[1]


def trace(devices: dict, **top) -> dict:
    return {"format": "fedfill-traces", "version": 1, **top, "devices": devices}


def write(tmp_path: Path, data, name: str = "trace.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_availability_next_on_and_going_off_follow_the_intervals():
    traces = parse_traces(trace({"0": {"on": [[10, 20], [20, 30], [50, 60]]}, "1": {"on": []}}))
    device = traces.devices[0]
    assert device.on.tolist() == [[10, 30], [50, 60]], "touching intervals are one"
    assert [device.available(t) for t in (9.9, 10, 29.9, 30, 55, 60)] == [False, True, True, False, True, False]
    assert device.next_on(0) == 10 and device.next_on(15) == 15 and device.next_on(35) == 50
    assert device.next_on(60) is None, "a trace that does not repeat leaves the device off for good"
    assert device.off_at(12, 25) is None and device.off_at(12, 40) == 30 and device.off_at(40, 45) == 40
    assert traces.round_start(35, [0, 1]) == 50 and traces.round_start(61, [0, 1]) is None


def test_a_periodic_trace_repeats_and_joins_across_the_period_end():
    device = parse_traces(trace({"0": {"on": [[0, 10], [90, 100]]}}, period_s=100)).devices[0]
    assert device.available(95) and device.available(105) and not device.available(150)
    assert device.off_at(95, 108) is None, "on from 90 to 110 across the period's end"
    assert device.off_at(95, 115) == 110 and device.next_on(50) == 90 and device.next_on(150) == 190


def test_capacity_is_a_step_function_scaling_f_max_and_the_uplink_rate():
    device = parse_traces(trace({"0": {"on": [[0, 100]], "capacity": [[10, 0.5, 2.0], [20, 1.5, 0.25]]}})).devices[0]
    assert [device.capacity_at(t) for t in (5, 10, 15, 25)] == [(1.0, 1.0), (0.5, 2.0), (0.5, 2.0), (1.5, 0.25)]
    profile = {"f_max_hz": 1e9, "gain": 1e-10, "p_max_w": 0.2, "eps": 5e-27, "d_loc": 100}
    noise, band = 4e-21, 1e6
    for uplink in (0.25, 1.0, 3.0):
        scaled = scaled_profile(profile, 0.5, uplink, noise, band)
        assert scaled["f_max_hz"] == 0.5e9 and scaled["eps"] == profile["eps"]
        ratio = uplink_rate(band, 0.2, scaled["gain"], noise) / uplink_rate(band, 0.2, profile["gain"], noise)
        assert math.isclose(ratio, uplink, rel_tol=1e-9), "the rate at its band share and full power scales"


@pytest.mark.parametrize("data,message", [
    ("", "empty"),
    ("{not json", "not JSON"),
    ({"devices": {}}, "not a trace file"),
    (trace({}), "no devices"),
    (trace({"a": {"on": []}}), "partition ids"),
    (trace({"0": {"on": [[5, 3]]}}), "its end must come after its start"),
    (trace({"0": {"on": [[-1, 3]]}}), "0 or more"),
    (trace({"0": {"on": [[0, 10], [5, 20]]}}), "overlaps"),
    ('{"format": "fedfill-traces", "version": 1, "devices": {"0": {"on": [[0, NaN]]}}}', "not a finite number"),
    (trace({"0": {"on": [[0, 1e400]]}}), "not a finite number"),
    (trace({"0": {"on": [[0, 10]], "capacity": [[0, 0, 1]]}}), "must be positive"),
    (trace({"0": {"on": [[0, 10]], "capacity": [[5, 1, 1], [5, 1, 1]]}}), "times must increase"),
    (trace({"0": {"on": [[0, 200]]}}, period_s=100), "past the period"),
    (trace({"0": {"on": [[0, 10]], "speed": 1}}), "unknown key"),
])
def test_malformed_traces_are_refused_with_the_reason(tmp_path, data, message):
    with pytest.raises(TraceError, match=message):
        load_traces(write(tmp_path, data))


def test_the_pre_run_check_holds_the_trace_to_the_fleet(tmp_path):
    path = write(tmp_path, trace({"0": {"on": [[0, 10]]}, "1": {"on": []}, "2": {"on": []}}))
    check_traces(str(path), 3)
    with pytest.raises(UsageError, match=r"names device\(s\) 2 the fleet does not have"):
        check_traces(str(path), 2)
    with pytest.raises(UsageError, match=r"lacks device\(s\) 3 of the fleet's 4"):
        check_traces(str(path), 4)
    never = write(tmp_path, trace({"0": {"on": []}}), "never.json")
    with pytest.raises(UsageError, match="no device is ever on"):
        check_traces(str(never), 1)
    with pytest.raises(UsageError, match="cannot read it"):
        check_traces(str(tmp_path / "missing.json"), 1)


def test_synthetic_traces_are_the_same_for_a_seed_and_differ_across_seeds(tmp_path):
    first, second, other = (synth_traces(20, 48, seed) for seed in (3, 3, 4))
    assert first.to_json() == second.to_json() and first.to_json() != other.to_json()
    assert main(["traces", "synth", "--nodes", "20", "--hours", "48", "--seed", "3", "-o", str(tmp_path / "a.json")]) == 0
    assert load_traces(tmp_path / "a.json").to_json() == first.to_json(), "the file holds the draw"
    first.check_fleet(20)
    on_share = sum(float((d.on[:, 1] - d.on[:, 0]).sum()) for d in first.devices.values()) / (20 * 48 * 3600)
    assert 0.4 < on_share < 0.9, "devices are on some of the time, not all or none"
    cpus = sorted(d.capacity_at(0)[0] for d in first.devices.values())
    assert cpus[0] < 1 < cpus[-1], "lognormal capacities around 1"


def fedscale_files(tmp_path: Path) -> tuple[Path, Path]:
    """A small pair in FedScale's shapes: behaviour (client id -> active/inactive/finish_time,
    duration, model) and capacity (client id -> ms per sample, kbps)."""
    behave = {1: {"duration": 400, "inactive": [50, 300], "finish_time": 400, "active": [0, 100], "model": "SM-G920F"},
              2: {"duration": 400, "inactive": [400], "finish_time": 400, "active": [200], "model": "Pixel"},
              7: {"duration": 100, "inactive": [100], "finish_time": 100, "active": [0], "model": "Pixel"}}
    capacity = {1: {"computation": 100.0, "communication": 2000.0}, 2: {"computation": 50.0, "communication": 8000.0},
                7: {"computation": 200.0, "communication": 4000.0}, 9: {"computation": 1.0, "communication": 1.0}}
    (tmp_path / "behave").write_bytes(pickle.dumps(behave))
    (tmp_path / "capacity").write_bytes(pickle.dumps(capacity))
    return tmp_path / "behave", tmp_path / "capacity"


def test_fedscale_traces_convert_to_a_fleet_of_the_clients_both_files_name(tmp_path):
    behave, capacity = fedscale_files(tmp_path)
    out = tmp_path / "fleet.json"
    assert main(["traces", "convert-fedscale", str(behave), str(capacity), "-o", str(out)]) == 0
    traces = load_traces(out)
    assert sorted(traces.devices) == [0, 1, 2]
    assert [traces.devices[k].source for k in range(3)] == ["fedscale:1", "fedscale:2", "fedscale:7"]
    first = traces.devices[0]
    assert first.on.tolist() == [[0, 50], [100, 300]] and first.period_s == 400
    assert first.available(420) and not first.available(460), "FedScale's traces repeat every finish_time"
    # factors against the medians (100 ms a sample, 4000 kbps): client 2 computes twice as fast
    assert traces.capacity_at(1, 0) == (2.0, 2.0) and traces.capacity_at(0, 0) == (1.0, 0.5)
    assert main(["traces", "convert-fedscale", str(behave), str(capacity), "--nodes", "2", "-o", str(out)]) == 0
    assert sorted(load_traces(out).devices) == [0, 1]


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload,message", [
    ("hostile", "refusing to load anything else"),
    (b"\x80\x04not a pickle", "not a pickle of plain data"),
    ([1, 2, 3], "not a non-empty dict"),
    ({1: {"active": [0], "inactive": [10]}}, "finish_time"),
])
def test_a_pickle_that_is_not_fedscales_shape_is_refused_and_never_run(tmp_path, capsys, payload, message):
    _, capacity = fedscale_files(tmp_path)
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(payload if isinstance(payload, bytes) else
                    pickle.dumps({1: _Hostile(marker)} if payload == "hostile" else payload))
    assert main(["traces", "convert-fedscale", str(bad), str(capacity), "-o", str(tmp_path / "o.json")]) == 2
    assert message in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o.json").exists()
    with pytest.raises(TraceError):
        from_fedscale(read_plain_pickle(bad, "behaviour trace"), {1: {"computation": 1, "communication": 1}})


def test_fedfill_run_refuses_a_trace_that_does_not_fit_before_anything_starts(tmp_path):
    path = write(tmp_path, trace({"0": {"on": [[0, 10]]}, "5": {"on": [[0, 10]]}}))
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--rounds", "1", "--generator",
                           "none", "--traces", str(path), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--traces" in done.stderr and "names device(s) 5 the fleet does not have" in done.stderr
    assert not (tmp_path / "run" / "flwr.log").exists(), "nothing was started"


@pytest.mark.slow
def test_a_trace_driven_run_samples_the_devices_on_and_drops_one_that_goes_off(tmp_path):
    """3 devices on from t=30 s (none at 0: the clock waits), device 2 off at 120 s: with FIMI's
    60 s rounds it is dropped mid-round 2 (planned to end at 150 s) and not sampled in round 3.
    About 45 s on 2 cores."""
    path = write(tmp_path, trace({"0": {"on": [[30, 1e6]]},
                                  "1": {"on": [[30, 1e6]], "capacity": [[0, 0.5, 1.0], [100, 1.0, 0.5]]},
                                  "2": {"on": [[30, 120]]}}))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--rounds", "3", "--generator",
                           "none", "--traces", str(path), "--out", str(out), "--timeout", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    from tests.test_job_simulation import processes_of_run

    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    waits = [float(r["virtual_wait_s"]) for r in rows]
    assert waits == [0.0, 30.0, 0.0, 0.0], "round 1 waits for the first device to come on"
    for before, row in zip(rows, rows[1:]):
        latency = float(row["round_latency_s"])
        assert latency > 0
        assert math.isclose(float(row["virtual_s"]), float(before["virtual_s"]) + float(row["virtual_wait_s"]) + latency)
    assert [(r["sampled"], r["updates"], r["dropped_offline"], r["dropped_nodes"]) for r in rows[1:]] == [
        ("3", "3", "0", ""), ("3", "2", "1", "2"), ("2", "2", "0", "")]
    with open(out / "devices.csv") as fh:
        devices = list(csv.DictReader(fh))
    (drop,) = [d for d in devices if d["status"] == "dropped"]
    assert drop["round"] == "2" and drop["partition_id"] == "2"
    assert drop["reason"].startswith("went offline at virtual t=120.0 s, mid-round")
    assert {d["partition_id"] for d in devices if d["round"] == "3"} == {"0", "1"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["virtual_s"] == float(rows[-1]["virtual_s"]) and 0 < summary["wall_s"] < summary["virtual_s"]
    assert f"virtual clock {summary['virtual_s']:.0f} s (modeled)" in done.stdout
    assert "the clock jumps 30 s" in (out / "flwr.log").read_text()
    assert processes_of_run(out) == [], "processes of the run were left running"
