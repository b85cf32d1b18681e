"""The testbed's parts that need no Docker daemon: its bad-input answers, the mirror the base
image is made from, the rate each node is shaped to, and the uplink table's arithmetic."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedfill(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfill", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_no_docker_daemon_is_one_line_and_exit_2(tmp_path):
    done = fedfill("testbed", "status", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Docker daemon" in lines[0] and "dockerd" in lines[0]


def test_a_scenario_that_does_not_match_the_nodes_is_refused_before_docker(tmp_path):
    scenario = tmp_path / "two.json"
    assert fedfill("scenario", "--devices", "2", "--out", str(scenario)).returncode == 0
    done = fedfill("testbed", "up", "--nodes", "3", "--scenario", str(scenario),
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert done.returncode == 2 and "has 2 devices but --nodes is 3" in done.stderr


def test_the_mirror_comes_from_the_hosts_apt_sources(tmp_path):
    from deploy.image import apt_mirror

    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "sources.list").write_text("# a comment\ndeb [arch=amd64] http://old.example/debian bookworm main\n")
    assert apt_mirror(legacy) == "http://old.example/debian"
    empty = tmp_path / "empty"
    empty.mkdir()
    from fedfill.errors import UsageError

    with pytest.raises(UsageError, match="--base-image"):
        apt_mirror(empty)


def test_cpu_quota_follows_f_max():
    from deploy.testbed import MIN_CPUS, cpus_for

    assert cpus_for(2e9) == 1.0 and cpus_for(1e9) == 0.5 and cpus_for(1e6) == MIN_CPUS


def test_each_node_is_shaped_to_its_plans_rate_times_the_scale(tmp_path):
    from deploy.shaper import UplinkShaper

    (tmp_path / "system.json").write_text(json.dumps({"model_params": 1000}))
    plan = {"node_ids": [11, 22, 33], "devices": [{"bits": 8, "t_com_s": 2.0}, {"bits": 32, "t_com_s": 0.5},
                                                  {"bits": 8, "t_com_s": 0.0}]}
    shaper = UplinkShaper(None, tmp_path, {}, scale=0.5)
    assert shaper.rates(plan) == {11: 1000 * 8 / 2.0 * 0.5, 22: 1000 * 32 / 0.5 * 0.5}  # no rate for t_com 0


def test_the_uplink_table_sets_measured_beside_bytes_over_the_shaped_rate(tmp_path):
    from deploy.uplink_report import write_uplink_report

    with open(tmp_path / "shaping.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["round", "node_id", "container", "rate_bps", "plan_seen_at",
                                                "applied_at", "error"])
        writer.writeheader()
        writer.writerow({"round": 1, "node_id": 7, "container": "x-node-0", "rate_bps": 80_000,
                         "plan_seen_at": 1.0, "applied_at": 1.1, "error": ""})
        writer.writerow({"round": 1, "node_id": 8, "container": "x-node-1", "rate_bps": 80_000,
                         "plan_seen_at": 1.0, "applied_at": "", "error": "gone"})
    with open(tmp_path / "devices.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["round", "node", "partition_id", "t_com_s", "upload_s",
                                                "reply_bytes", "status"])
        writer.writeheader()
        writer.writerow({"round": 1, "node": 7, "partition_id": 0, "t_com_s": 1.0, "upload_s": 3.5,
                         "reply_bytes": 20_000, "status": "used"})
        writer.writerow({"round": 1, "node": 8, "partition_id": 1, "t_com_s": 1.0, "upload_s": 9.0,
                         "reply_bytes": 20_000, "status": "used"})
    rows = write_uplink_report(tmp_path)
    assert len(rows) == 1  # node 8's shaping failed: no claim about its link
    assert rows[0]["expected_s"] == pytest.approx(8 * 20_000 / 80_000) and rows[0]["upload_s"] == 3.5
    assert (tmp_path / "uplink.png").stat().st_size > 0 and (tmp_path / "uplink.csv").exists()
