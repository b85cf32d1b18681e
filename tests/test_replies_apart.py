"""Replies apart (issue 26, item 1): a node killed in training or mid-upload costs its own
update, and its round closes on the others within 30 s; the fault injector `--kill-at` that
lands those kills, its refusals, and the Flower internals the fix wraps (the tests that fail
when an upgrade changes them)."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from client.faults import find_hold
from client.supernode import node_heartbeat_found
from server.timed_grid import reply_split_found

ROOT = Path(__file__).resolve().parents[1]


def test_the_pull_the_grid_splits_is_still_flowers():
    """Fails when a Flower upgrade changes HttpGrid.pull_messages, which server/timed_grid.py
    re-states in two halves: re-read it, update the split and its hash."""
    found, which = reply_split_found()
    assert found, which


def test_the_heartbeat_interval_is_still_where_the_supernode_sets_it():
    """Fails when a Flower upgrade moves the SuperNode's heartbeat interval literal."""
    found, which = node_heartbeat_found()
    assert found, which


@pytest.mark.parametrize("spec, says", [
    ("5:2:train", "there is no node 5; the run starts nodes 0..4"),
    ("1:0:upload", "there is no round 0; the run has rounds 1..3"),
    ("1:4:upload", "there is no round 4"),
    ("1:2:evaluate", "phase 'evaluate': choose train or upload"),
    ("1-2-upload", "expected NODE:ROUND:PHASE"),
    ("x:2:upload", "expected NODE:ROUND:PHASE"),
])
def test_a_kill_at_naming_nothing_that_exists_is_refused_with_the_reason(spec, says):
    from commands.run import parse_kill_at
    from fedfill.errors import UsageError

    with pytest.raises(UsageError, match=says):
        parse_kill_at([spec], 5, 3)
    with pytest.raises(UsageError, match="killed once already"):
        parse_kill_at(["1:2:train", "1:3:upload"], 5, 3)
    assert [str(f) for f in parse_kill_at(["1:2:train", "4:3:upload"], 5, 3)] == ["1:2:train", "4:3:upload"]


def test_the_refusal_comes_before_anything_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--rounds", "2", "--generator",
                           "none", "--out", str(tmp_path / "run"), "--kill-at", "0:1:train"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "add --engine deployment" in done.stderr
    assert not (tmp_path / "run" / "logs").exists()


def test_the_hold_line_is_found_by_phase_and_round():
    log = ("INFO: Received\n\x1b[93mWARNING \x1b[0m:   fedfill fault: round 3: holding in upload until killed "
           "(1 of the reply's 6 objects pushed)\n")
    assert find_hold(log, "upload", 3).endswith("(1 of the reply's 6 objects pushed)")
    assert find_hold(log, "upload", None) and find_hold(log, "train", 3) is None and find_hold(log, "upload", 2) is None


@pytest.mark.slow
def test_a_node_killed_in_training_or_mid_upload_costs_its_update_and_under_30_s(tmp_path):
    """One real run (SuperLink, SuperNodes, sockets): node 1 killed while training in round 2,
    node 3 killed mid-upload in round 3. Each kill lands in its phase (the node's hold line),
    each round closes on the others within 30 s of a round without a kill, and each killed
    node's drop says what happened."""
    from tests.test_job_simulation import processes_of_run

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "4",
                           "--rounds", "4", "--generator", "none", "--out", str(out), "--timeout", "400",
                           "--kill-at", "1:2:train", "--kill-at", "3:3:upload"],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    kills = (out / "logs" / "kills.log").read_text().splitlines()
    assert len(kills) == 2, kills
    assert "kill-at 1:2:train" in kills[0] and "round 2: holding in train until killed" in kills[0]
    assert "kill-at 3:3:upload" in kills[1] and "round 3: holding in upload until killed" in kills[1]
    assert "objects pushed" in kills[1], "the SuperLink holds the reply with objects missing"
    rounds = {int(r["round"]): r for r in csv.DictReader((out / "rounds.csv").open())}
    calm = statistics.median(float(rounds[r]["wall_s"]) for r in (1, 4))
    for killed, left in ((2, 3), (3, 2)):  # node 1 stays down after round 2
        assert int(rounds[killed]["updates"]) == left and int(rounds[killed]["dropped_no_reply"]) == 1
        assert float(rounds[killed]["wall_s"]) <= calm + 30, (killed, rounds[killed]["wall_s"], calm)
    assert int(rounds[4]["updates"]) == 2, "both killed nodes stay down"
    partitions = {int(p["partition_id"]) for p in json.loads((out / "profiles.json").read_text()).values()}
    assert partitions == {0, 1, 2, 3}
    drops = {(int(r["round"]), int(r["partition_id"])): r["reason"] for r in csv.DictReader((out / "devices.csv").open())
             if r["status"] == "dropped"}
    assert set(drops) == {(2, 1), (3, 3)}, drops
    assert "went offline before any of its reply reached the SuperLink" in drops[(2, 1)]
    assert "went offline mid-upload" in drops[(3, 3)] and "objects of its reply in" in drops[(3, 3)]
    assert processes_of_run(out) == [], "processes of the run were left running"
