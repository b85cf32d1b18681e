"""The warm ClientApp on the deployment engine, as `fedfill run` starts it: real SuperLink,
`fedfill supernode` processes, their fork-servers and forked tasks (tests/test_warm_clientapp.py
has the fork-server's own tests)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_job_simulation import ROOT, processes_of_run


def fork_servers(out: Path) -> dict[int, int]:
    """The fork-servers of the run writing to `out`, by pid, each with its parent (the `fedfill
    supernode` process): a fork-server's forked tasks share its command line, not its parent."""
    home = f"FLWR_HOME={out / '.flwr'}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"client.warm\0serve" in cmdline and home in environ:
            found[int(proc.name)] = parent
    return {pid: parent for pid, parent in found.items() if parent not in found}  # not a forked task


def running_tasks(fork_server: int) -> list[str]:
    """The tasks a fork-server has forked and that still run."""
    try:
        return Path(f"/proc/{fork_server}/task/{fork_server}/children").read_text().split()
    except OSError:
        return []


@pytest.mark.slow
def test_a_killed_fork_server_is_restarted_and_no_update_is_lost(tmp_path):
    """The fork-server of one node is SIGKILLed after round 1: its SuperNode starts a new one,
    tasks in between run cold (the shim's fallback), every round keeps every node's update,
    and once the run ends nothing of it is left running."""
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "2",
                            "--rounds", "3", "--generator", "none", "--out", str(out), "--timeout", "400"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rounds_csv, deadline = out / "rounds.csv", time.monotonic() + 300
        while not (rounds_csv.exists() and len(rounds_csv.read_text().splitlines()) >= 3):  # header, rounds 0, 1
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never came"
            time.sleep(0.5)
        servers = fork_servers(out)
        assert len(servers) == 2, servers  # one per node
        victim, supernode = next(iter(servers.items()))
        # between its tasks: one killed under a task costs that task by design (client/warm.py's
        # shim ends it), which is not what this test is about
        deadline = time.monotonic() + 120
        while running_tasks(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [p for p, parent in fork_servers(out).items()
                                                   if parent == supernode and p != victim]:
            time.sleep(0.2)
        assert [p for p, parent in fork_servers(out).items() if parent == supernode and p != victim], \
            "the node did not restart its fork-server"
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, output
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["updates"]) for r in rows[1:]] == [2, 2, 2], "a restarted fork-server may cost no update"
    logs = "".join(p.read_text(errors="replace") for p in (out / "logs").glob("supernode-*.log"))
    assert "fork-server exited" in logs and "restarting it" in logs
    with open(out / "devices.csv") as fh:
        nodes = list(csv.DictReader(fh))
    # where each node's part of the round went is known for every reply
    assert all(row["delivery_s"] and row["launch_s"] and row["handler_s"] and row["upload_s"] for row in nodes)
    assert processes_of_run(out) == [], "processes of the run were left running"
