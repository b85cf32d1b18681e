"""Flower's own SuperNode, with a warm ClientApp and short waits (`fedfill supernode`,
commands/supernode.py, is its command line).

Runs Flower's `flower-supernode` (its main, in this process, with the arguments given) after
three launcher-level changes, measured together by bench/bench_flower.py:

1. **Warm ClientApp** (client.warm): PATH starts with a directory whose `flwr-clientapp` is
   the shim, and a fork-server that has imported Flower's ClientApp runtime and the app's
   modules runs beside the SuperNode (restarted if it dies). Flower's SuperExec still starts
   one `flwr-clientapp` per task, as it ships; the task just skips the imports.
2. **SuperExec's task poll**: Flower's own setting FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 1 s ->
   0.25 s unless the environment sets it (lower made things worse on 2 cores, design §8).
3. **The SuperNode's waits**: with nothing to pull, Flower sleeps a fixed 3 s before asking
   the SuperLink again, and it checks for the ClientApp's reply every 0.5 s. A round waits for
   its last node, and each node's pull lands anywhere in its 3 s: with 3 nodes the last of
   them takes the round's message 2.25 s late on average (the largest of three uniform waits). Here a node that handled a
   message in the last `--active-s` (60 s: a run is going on) asks every `--idle-poll-s`
   (0.3 s), then doubles its wait up to Flower's 3 s (an idle node asks as often as Flower's
   does), and it checks for the reply every 0.1 s. Each ask is a request to the SuperLink:
   10 active nodes make ~33 a second. These
   waits are literals inside `flwr.supernode.start_client_internal`, so this wraps that
   module's `time` and `_push_messages`: only for flwr 1.41.0, whose code it was written
   against (FLOWER_VERSION; tests/test_warm_clientapp.py checks the literals are still there).
   Another Flower version runs with its own waits and says so.

`--clientapp flower` changes none of these: Flower's SuperNode as it ships, the benchmark's
baseline. Both set the node's heartbeat (`--heartbeat-s`, 10 s, the least the SuperLink takes,
against Flower's 30 s): the SuperLink marks a node offline when it has not heard from it for
twice that interval, and that is how soon a round can give up on a node that died (60 s with
Flower's, 20 s here; the ServerApp's server/timed_grid.py). The interval is a literal Flower's
SuperNode sends (HEARTBEAT_DEFAULT_INTERVAL, in its connection module and its heartbeat
sender), with no option, so this sets it there, for FLOWER_VERSION only
(`node_heartbeat_found`). Its cost is a heartbeat every ~4 s per node, and a node whose
heartbeats all fail for 20 s (a loaded host) is counted offline and its update of that round
lost. A node asked to hold for fault injection (client/faults.py) wraps `_push_messages` too.
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from logging import INFO, WARNING
from pathlib import Path

from client.warm import PRELOAD_ENV, SOCKET_ENV

FLOWER_VERSION = "1.41.0"  # the flwr whose SuperNode loop the waits below were written for
FLOWER_IDLE_S = 3  # flwr 1.41 start_client_internal: `time.sleep(3)` when nothing was pulled
FLOWER_REPLY_POLL_S = 0.5  # and `time.sleep(0.5)` while the ClientApp's reply is not there
REPLY_POLL_S = 0.1
TASK_POLL_ENV, TASK_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25"
FLOWER_HEARTBEAT_S = 30  # flwr 1.41 HEARTBEAT_DEFAULT_INTERVAL, what its SuperNode sends
HEARTBEAT_S = 10  # flwr 1.41 HEARTBEAT_MIN_INTERVAL: the least interval its SuperLink accepts


def run_supernode(flower_args: list[str], *, clientapp: str = "warm", idle_poll_s: float = 0.3,
                  active_s: float = 60.0, heartbeat_s: float = HEARTBEAT_S) -> int:
    """Flower's SuperNode with `flower_args`; with clientapp "warm", the three changes above;
    either way the heartbeat interval `heartbeat_s` (0: Flower's) and the fault hold."""
    from client.faults import install_upload_hold

    if heartbeat_s:
        set_node_heartbeat(heartbeat_s)
    if install_upload_hold():
        from flwr.common import log

        log(WARNING, "fedfill: fault injection armed (%s): the node holds where it is asked to",
            os.environ.get("FEDFILL_HOLD_FILE"))
    if clientapp == "warm":
        os.environ.setdefault(TASK_POLL_ENV, TASK_POLL_S)
        warm = WarmClientApp().start()
        shorten_node_waits(idle_poll_s, active_s)  # imports Flower's SuperNode meanwhile
        warm.wait_serving()
    return run_flower_supernode(flower_args)


def run_flower_supernode(flower_args: list[str]) -> int:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


class WarmClientApp:
    """The fork-server of this SuperNode and the `flwr-clientapp` shim that reaches it.

    The fork-server stays in this process group (ending the SuperNode's group ends it), exits
    when this process is gone, and is restarted by a watcher thread when it dies on its own.
    """

    def __init__(self, preload: tuple[str, ...] | None = None):
        from client.app import WARM_FIRST, WARM_IMPORTS

        self.directory = Path(tempfile.mkdtemp(prefix="fedfill-warm-"))
        self.socket = str(self.directory / "clientapp.sock")
        extra = [m for m in os.environ.get(PRELOAD_ENV, "").split(",") if m]
        self.preload = tuple(preload if preload is not None else WARM_IMPORTS) + tuple(extra)
        self.first = WARM_FIRST if preload is None else len(self.preload)  # imported before the node serves
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False

    def start(self) -> "WarmClientApp":
        bin_dir = self.directory / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "flwr-clientapp"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m client.warm shim \"$@\"\n")
        shim.chmod(0o755)
        # Flower's SuperExec is started by the SuperNode with this environment and finds
        # flwr-clientapp by name on PATH: the shim first
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ[SOCKET_ENV] = self.socket
        self._spawn()
        threading.Thread(target=self._watch, name="fedfill-warm-watch", daemon=True).start()
        atexit.register(self.stop)
        return self

    def wait_serving(self, timeout_s: float = 60.0) -> bool:
        """Wait until the fork-server answers, so that the node's first task is warm too; after
        `timeout_s` the node goes on (its tasks run cold until the server answers)."""
        import socket

        from flwr.common import log

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(self.socket) == 0:
                    return True
            time.sleep(0.1)
        log(WARNING, "fedfill: the warm ClientApp's fork-server does not answer; tasks start cold until it does")
        return False

    def _spawn(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "client.warm", "serve", "--socket", self.socket,
                                         "--preload", ",".join(self.preload), "--first", str(self.first),
                                         "--parent-pid", str(os.getpid())])

    def _watch(self) -> None:
        from flwr.common import log

        while not self._stopping:
            code = self.process.wait()
            if self._stopping:
                return
            self.restarts += 1
            log(WARNING, "fedfill: the warm ClientApp's fork-server exited (code %s): restarting it (%d)",
                code, self.restarts)
            time.sleep(min(10.0, 0.5 * self.restarts))  # a server that cannot start is not restarted in a loop
            self._spawn()

    def stop(self) -> None:
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)  # also when called twice (explicitly, then at exit)


class _NodeClock:
    """Stands in for the `time` module inside flwr.supernode.start_client_internal: its two
    fixed waits become short ones (module docstring, item 3); everything else is `time`."""

    def __init__(self, idle_poll_s: float, active_s: float = 60.0):
        self.fastest_s, self.active_s = idle_poll_s, active_s
        self.idle_s = idle_poll_s
        self.last_message = -math.inf  # monotonic time the node last handled a message

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:  # nothing was pulled
            if time.monotonic() - self.last_message > self.active_s:  # no run going on: back off to Flower's
                self.idle_s = min(2 * self.idle_s, FLOWER_IDLE_S)
            time.sleep(self.idle_s)
        elif seconds == FLOWER_REPLY_POLL_S:
            time.sleep(REPLY_POLL_S)
        else:
            time.sleep(seconds)

    def message_handled(self) -> None:
        self.idle_s = self.fastest_s
        self.last_message = time.monotonic()

    def __getattr__(self, name):
        return getattr(time, name)


def node_loop_waits_found() -> tuple[bool, str]:
    """Whether the installed Flower's SuperNode loop is the one the wrapper was written for:
    the pinned version, with its `time.sleep(3)` and `time.sleep(0.5)` and `_push_messages`."""
    import flwr.supernode.start_client_internal as loop

    installed = version("flwr")
    if installed != FLOWER_VERSION:
        return False, f"flwr {installed} (the wrapper is for {FLOWER_VERSION})"
    source = inspect.getsource(loop)
    missing = [text for text in (f"time.sleep({FLOWER_IDLE_S})", f"time.sleep({FLOWER_REPLY_POLL_S})")
               if text not in source]
    if missing or not callable(getattr(loop, "_push_messages", None)):
        return False, f"flwr {installed}'s SuperNode loop has no {' / '.join(missing) or '_push_messages'}"
    return True, f"flwr {installed}"


def shorten_node_waits(idle_poll_s: float, active_s: float = 60.0) -> _NodeClock | None:
    """Wrap the SuperNode loop's waits (module docstring, item 3); None where the installed
    Flower is not the one it was written for (Flower's own waits then apply)."""
    import flwr.supernode.start_client_internal as loop
    from flwr.common import log

    found, which = node_loop_waits_found()
    if not found:
        log(WARNING, "fedfill: %s: the SuperNode keeps Flower's own 3 s idle wait", which)
        return None
    clock = _NodeClock(idle_poll_s, active_s)
    push_messages = loop._push_messages

    def push_then_ask_soon(*args, **kwargs):
        try:
            return push_messages(*args, **kwargs)
        finally:
            clock.message_handled()

    loop.time = clock
    loop._push_messages = push_then_ask_soon
    log(INFO, "fedfill: warm ClientApp; the node asks for messages every %.2g s while a run is active (%g s "
        "after its last message), then waits up to %d s", idle_poll_s, active_s, FLOWER_IDLE_S)
    return clock


def node_heartbeat_found() -> tuple[bool, str]:
    """Whether the installed Flower's SuperNode sends the heartbeat interval this sets: the
    pinned version, the literal in its connection module and its heartbeat sender's loop."""
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant

    installed = version("flwr")
    if installed != FLOWER_VERSION:
        return False, f"flwr {installed} (the heartbeat is set for {FLOWER_VERSION})"
    found = {"connection": getattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", None),
             "sender": getattr(sender, "HEARTBEAT_DEFAULT_INTERVAL", None)}
    if any(value != FLOWER_HEARTBEAT_S for value in found.values()):
        return False, f"flwr {installed}'s SuperNode heartbeat interval is not {FLOWER_HEARTBEAT_S} s where set: {found}"
    sends = inspect.getsource(connection)
    if sends.count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") != 2:
        return False, f"flwr {installed}'s SuperNode no longer tells the SuperLink HEARTBEAT_DEFAULT_INTERVAL"
    if "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" not in inspect.getsource(sender.HeartbeatSender._run):
        return False, f"flwr {installed}'s heartbeat sender no longer waits by HEARTBEAT_DEFAULT_INTERVAL"
    if not constant.HEARTBEAT_MIN_INTERVAL <= HEARTBEAT_S:
        return False, f"flwr {installed}'s SuperLink takes no interval under {constant.HEARTBEAT_MIN_INTERVAL} s"
    return True, f"flwr {installed}"


def set_node_heartbeat(seconds: float) -> bool:
    """The interval the SuperNode announces and heartbeats by (module docstring); False, and
    Flower's own, where the installed Flower is not the one it was written for."""
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import log

    found, which = node_heartbeat_found()
    if not found:
        log(WARNING, "fedfill: %s: the node keeps Flower's heartbeat interval", which)
        return False
    connection.HEARTBEAT_DEFAULT_INTERVAL = sender.HEARTBEAT_DEFAULT_INTERVAL = seconds
    log(INFO, "fedfill: heartbeat interval %g s (the SuperLink counts the node offline %g s after its last)",
        seconds, 2 * seconds)
    return True
