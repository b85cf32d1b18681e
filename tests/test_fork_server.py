"""client/warm.py and client/supernode.py on their own: a real fork-server on a Unix socket,
real shims as Flower's SuperExec starts them, a task function of the test's own
(FEDFILL_WARM_ENTRY) in place of Flower's flwr-clientapp; and the pinned wrapper of the
SuperNode's waits (tests/test_warm_deployment.py has them inside a Flower run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client import supernode
from client.warm import ENTRY_ENV, SOCKET_ENV

ROOT = Path(__file__).resolve().parents[1]

TASKS = textwrap.dedent('''
    import os, sys, time
    COUNTER = 0

    def report():
        global COUNTER
        COUNTER += 1  # a fresh fork sees the parent's 0: no state from an earlier task
        print("argv", " ".join(sys.argv[1:]), "cwd", os.getcwd(), "env", os.environ.get("TASK_ENV", ""),
              "counter", COUNTER, "pid", os.getpid(), "stdin", sys.stdin.readline().strip(), flush=True)
        sys.exit(int(os.environ.get("TASK_CODE", "0")))

    def crash():
        raise RuntimeError("the task broke")

    def hang():
        print("hanging", os.getpid(), flush=True)
        time.sleep(600)
''')


@pytest.fixture
def server(tmp_path):
    """A fork-server that preloaded the tasks module, and the environment a shim needs."""
    (tmp_path / "tasks_mod.py").write_text(TASKS)
    sock = str(tmp_path / "warm.sock")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", SOCKET_ENV: sock}
    process = subprocess.Popen([sys.executable, "-m", "client.warm", "serve", "--socket", sock, "--preload",
                                "tasks_mod"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert process.poll() is None and time.monotonic() < deadline, "the fork-server did not come up"
        time.sleep(0.05)
    yield process, env
    process.terminate()
    process.wait(timeout=10)


def shim(env: dict, entry: str, *args: str, stdin: str = "", cwd: Path | None = None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.warm", "shim", *args], input=stdin, capture_output=True,
                          text=True, env={**env, ENTRY_ENV: f"tasks_mod:{entry}", **extra}, cwd=cwd, timeout=60)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_task_runs_as_the_shim_with_its_streams_arguments_and_exit_code(server, tmp_path):
    process, env = server
    done = shim(env, "report", "--token", "abc", stdin="hello\n", cwd=tmp_path, TASK_ENV="mine", TASK_CODE="3")
    assert done.returncode == 3, done.stderr
    fields = done.stdout.split()
    assert fields[:3] == ["argv", "--token", "abc"]
    assert fields[fields.index("cwd") + 1] == str(tmp_path) and fields[fields.index("env") + 1] == "mine"
    assert fields[fields.index("stdin") + 1] == "hello"
    assert int(fields[fields.index("pid") + 1]) != process.pid  # a forked child ran it
    assert shim(env, "report").returncode == 0


def test_tasks_share_no_state_and_each_is_a_new_process(server):
    _, env = server
    outputs = [shim(env, "report").stdout.split() for _ in range(3)]
    assert [o[o.index("counter") + 1] for o in outputs] == ["1", "1", "1"]
    assert len({o[o.index("pid") + 1] for o in outputs}) == 3


def test_a_crashing_task_fails_alone_and_the_server_serves_on(server):
    process, env = server
    crashed = shim(env, "crash")
    assert crashed.returncode == 1 and "RuntimeError: the task broke" in crashed.stderr
    assert process.poll() is None and shim(env, "report").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_hung_task_ends_with_its_shim(server, sig):
    """SIGTERM to the shim reaches the task; a shim killed outright takes its task with it (the
    server sees the connection close)."""
    _, env = server
    running = subprocess.Popen([sys.executable, "-m", "client.warm", "shim"], stdout=subprocess.PIPE, text=True,
                               env={**env, ENTRY_ENV: "tasks_mod:hang"})
    try:
        line = running.stdout.readline().split()
        assert line[0] == "hanging"
        task = int(line[1])
        running.send_signal(sig)
        running.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(task) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(task), "the task outlived its shim"
    finally:
        running.kill()
        running.wait()


def test_without_a_server_the_shim_runs_the_task_itself(tmp_path):
    (tmp_path / "tasks_mod.py").write_text(TASKS)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", SOCKET_ENV: str(tmp_path / "none.sock")}
    done = shim(env, "report", "--x", TASK_CODE="4")
    assert done.returncode == 4 and done.stdout.startswith("argv --x")


def test_the_server_leaves_when_its_parent_does(tmp_path):
    """A fork-server whose SuperNode died (its --parent-pid no longer its parent) exits."""
    sock = str(tmp_path / "warm.sock")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-m", "client.warm", "serve", "--socket", {sock!r},
                          "--parent-pid", str(os.getpid())], cwd={str(ROOT)!r})
        time.sleep(600)''')], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(sock), "the fork-server outlived its SuperNode"
    finally:
        parent.kill()


def test_warm_clientapp_restarts_its_server_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # start() prepends the shim's directory: undone after
    monkeypatch.setenv(SOCKET_ENV, "")
    warm = supernode.WarmClientApp(preload=()).start()
    try:
        assert warm.wait_serving(60)
        assert os.environ["PATH"].startswith(str(warm.directory / "bin"))
        first = warm.process.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (warm.process.pid == first or not warm.wait_serving(1)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert warm.restarts == 1 and warm.process.pid != first
    finally:
        warm.stop()
    assert not warm.directory.exists() and warm.process.poll() is not None


def test_the_wrapped_supernode_waits_are_still_in_the_pinned_flower():
    """Fails when a Flower upgrade moves the waits client/supernode.py wraps."""
    found, which = supernode.node_loop_waits_found()
    assert found, which


def test_the_node_clock_shortens_flowers_waits(monkeypatch):
    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    clock = supernode._NodeClock(0.3, active_s=60)
    clock.sleep(3)  # never a message yet: Flower's back-off, doubling from the short wait
    clock.sleep(3)
    clock.message_handled()
    clock.sleep(3)  # a run is going on: the short wait, again and again
    clock.sleep(3)
    clock.sleep(0.5)  # the reply poll
    clock.sleep(7)  # anything else untouched
    assert slept == [0.6, 1.2, 0.3, 0.3, supernode.REPLY_POLL_S, 7]
    clock.last_message -= 61  # the run went quiet
    slept.clear()
    for _ in range(5):
        clock.sleep(3)
    assert slept == [0.6, 1.2, 2.4, 3, 3]


def test_bad_options_are_refused_before_anything_starts():
    done = subprocess.run([sys.executable, "-m", "fedfill", "supernode", "--idle-poll-s", "0", "--insecure"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--idle-poll-s 0" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "fedfill", "supernode", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--clientapp" in helped.stdout
