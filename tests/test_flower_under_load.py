"""Flower's state under load (issue 26, item 4): the SQLite state of the testbed's SuperLink
waits for its lock (server/superlink.py), shown with a real lock held past Flower's 5 s by
another connection; the loopback deployment engine beside two busy loops finishes without
`--resume`; and the Flower literal the SuperLink wrapper replaces (the test that fails when an
upgrade changes it)."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.superlink import BUSY_TIMEOUT_MS, sqlite_pragmas_found

ROOT = Path(__file__).resolve().parents[1]
# what a run that met the reported failures has in its logs
FAILURES = ("database is locked", "task-token authentication failed", "500 Internal Server Error")


def test_flowers_sqlite_pragmas_are_still_the_ones_the_superlink_replaces():
    """Fails when a Flower upgrade changes SQLITE_PRAGMAS or where it applies them: re-read
    flwr.supercore.sql_mixin and update server/superlink.py."""
    found, which = sqlite_pragmas_found()
    assert found, which


def test_a_sql_state_connection_gets_the_busy_timeout(tmp_path, monkeypatch):
    import flwr.supercore.sql_mixin as mixin
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from sqlalchemy import text

    from server.superlink import set_sqlite_busy_timeout

    monkeypatch.setattr(mixin, "SQLITE_PRAGMAS", mixin.SQLITE_PRAGMAS)  # put back after the test
    assert set_sqlite_busy_timeout()
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()
    with store.session() as session:
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == BUSY_TIMEOUT_MS
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"  # Flower's other pragmas stay


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                            start_new_session=True)


def _node_status(db: Path) -> list[str]:
    """The node table's statuses, read as another reader (WAL: no lock taken from writers)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as reader:
        return [row[0] for row in reader.execute("SELECT status FROM node")]


@pytest.mark.slow
@pytest.mark.parametrize("busy_timeout_ms", [0, BUSY_TIMEOUT_MS], ids=["flowers-5s", "fedfill-60s"])
def test_a_write_lock_held_8_s_fails_flowers_state_and_is_waited_for_by_ours(tmp_path, busy_timeout_ms):
    """A real SuperLink on a SQLite file, a real SuperNode, and another connection holding the
    write lock 8 s (Flower's arm: until a request has failed), as a request descheduled on a
    loaded host holds it. With Flower's 5 s busy
    timeout the SuperLink answers the node's requests with 500 `database is locked` and the node
    leaves (the reported failure); with fedfill superlink's 60 s the requests wait and the node
    stays online."""
    from deploy.local import flower_environment, free_port, stop_group, wait_for_port

    env = flower_environment(tmp_path / ".flwr")
    port, db = free_port(), tmp_path / "superlink.db"
    superlink = _start([sys.executable, "-m", "fedfill", "superlink", "--busy-timeout-ms", str(busy_timeout_ms),
                        "--insecure", "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
                        "--database", str(db)], tmp_path / "superlink.log", env)
    node = None
    try:
        wait_for_port(port, 60, superlink)
        # Flower's waits (a pull every 3 s when idle): a request falls inside the lock
        node = _start([sys.executable, "-m", "fedfill", "supernode", "--clientapp", "flower", "--insecure",
                       "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())], tmp_path / "supernode.log", env)
        deadline = time.monotonic() + 60
        while _node_status(db) != ["online"]:
            assert time.monotonic() < deadline and node.poll() is None, (tmp_path / "supernode.log").read_text()
            time.sleep(0.3)
        def superlink_log() -> str:
            return (tmp_path / "superlink.log").read_text()

        lock = sqlite3.connect(str(db), isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the write lock, as a writer holds it
        held = time.monotonic()
        # 8 s, longer than Flower's 5 s busy timeout. Flower's arm holds on until one of the
        # node's requests has failed (30 s at most): on a loaded host the node's next request
        # can come late, and the control must see a request inside the lock to mean anything.
        while time.monotonic() - held < 8 or (not busy_timeout_ms and "database is locked" not in superlink_log()
                                               and time.monotonic() - held < 30):
            time.sleep(0.5)
        lock.execute("COMMIT")
        lock.close()
        if busy_timeout_ms:
            time.sleep(3)  # the waiting requests finish
            assert "SQLite busy timeout 60000 ms" in superlink_log()
            assert "database is locked" not in superlink_log()
            assert _node_status(db) == ["online"] and node.poll() is None
        else:
            assert "database is locked" in superlink_log(), "Flower's 5 s busy timeout no longer fails here"
            deadline = time.monotonic() + 20  # the node's 500, then its status, on a loaded host
            while _node_status(db) == ["online"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "500 Internal Server Error" in (tmp_path / "supernode.log").read_text()
            assert _node_status(db) != ["online"], "the node survived a 500"
    finally:
        for process in (node, superlink):
            if process is not None:
                stop_group(process)


@pytest.mark.slow
def test_the_deployment_engine_beside_two_busy_loops_finishes_without_resume(tmp_path):
    """A real loopback run (SuperLink, 4 SuperNodes, warm ClientApps) while two processes spin
    on the two cores: every round in, no node counted offline (every update used), and none of
    the reported failures in any Flower log."""
    from tests.test_job_simulation import processes_of_run

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(2)]
    out = tmp_path / "run"
    try:
        done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "4",
                               "--rounds", "3", "--generator", "none", "--out", str(out), "--timeout", "400"],
                              cwd=ROOT, capture_output=True, text=True, timeout=500)
        load = os.getloadavg()[0]
        assert all(b.poll() is None for b in busy), "a busy loop ended early"
    finally:
        for b in busy:
            os.killpg(b.pid, signal.SIGKILL)
            b.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert all(int(r["updates"]) == 4 and int(r["dropped"]) == 0 for r in rows[1:]), (rows, load)
    for log in [out / "flwr.log", *(out / "logs").glob("*.log")]:
        text = log.read_text(errors="replace")
        assert not [f for f in FAILURES if f in text], (log.name, load)
    assert processes_of_run(out) == [], "processes of the run were left running"
