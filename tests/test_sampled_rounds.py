"""Sampled rounds on a fleet beyond the real digits (issue 25 items 2 and 3), end to end:
`fedfill run --dataset synthetic-digits --nodes 120 --fraction 0.05` on Flower's simulation
engine, as a user runs it. Real processes: the fedfill CLI, `flwr run`, a simulation SuperLink
and 120 virtual SuperNodes on Ray. About 45 s on 2 cores (no generation service: the fill is
not what is tested here)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_job_simulation import processes_of_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_sampled_run_of_120_synthetic_digit_devices_plans_and_reports_the_sampled_ones(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FEDFILL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--dataset", "synthetic-digits", "--nodes", "120",
                           "--fraction", "0.05", "--min-nodes", "4", "--rounds", "2", "--generator", "none",
                           "--out", str(out), "--timeout", "400"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "120 nodes (6 sampled a round)" in done.stdout
    assert "training data synthetic: 6000 images drawn by the shipped GAN" in done.stdout
    assert len(list((tmp_path / "cache" / "populations").glob("*-seed0-n6000.npz"))) == 1
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["round"]), int(r["sampled"]), int(r["updates"])) for r in rows] == [(0, 0, 0), (1, 6, 6), (2, 6, 6)]
    with open(out / "devices.csv") as fh:
        devices = list(csv.DictReader(fh))
    partitions = {}
    for row in devices:
        partitions.setdefault(int(row["round"]), set()).add(int(row["partition_id"]))
    assert {k: len(v) for k, v in partitions.items()} == {1: 6, 2: 6} and len(devices) == 12
    assert partitions[1] != partitions[2], "each round samples anew"
    for server_round in (1, 2):
        plan = json.loads((out / f"plan_round_{server_round}.json").read_text())
        assert len(plan["devices"]) == 6 == len(plan["node_ids"])
    # every one of the 120 nodes reported its profile once, at start
    assert len(json.loads((out / "profiles.json").read_text())) == 120
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nodes"] == 120 and summary["fraction"] == 0.05 and summary["min_nodes"] == 4
    assert summary["training_data"].startswith("synthetic:") and "test set is the real digits" in summary["training_data"]
    assert processes_of_run(out) == [], "processes of the run were left running"


def test_every_profile_of_a_large_fleet_is_drawn_in_linear_time():
    """Each node's drawn profile used to redraw the whole fleet (43 ms at 1,000 devices, once per
    node: ~170 s for the pre-run check of 2,000 nodes, and as much again in the ClientApps)."""
    import time

    from strategies.allocation.presets import drawn_device_profile, fimi_scenario

    started = time.monotonic()
    profiles = [drawn_device_profile("fimi", k, 2000, 7) for k in range(2000)]
    assert time.monotonic() - started < 5.0
    fleet = fimi_scenario(2000, 7).devices
    assert [p["f_max_hz"] for p in profiles] == fleet.f_max.tolist()
    assert [p["gain"] for p in profiles] == fleet.gain.tolist()
