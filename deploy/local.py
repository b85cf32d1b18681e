"""Flower's processes on this machine, each started in its own process group and ended with
it: the simulation SuperLink (Ray) and the deployment engine's SuperLink and N SuperNodes.

A SuperNode starts a `flower-superexec` child that outlives a plain kill of its parent, so
every component is a session leader and `stop` ends the whole group (SIGTERM, then SIGKILL).
Every Flower process of a run gets `flower_environment`: the run's own FLWR_HOME, runtime
dependency installation off, and Flower's commands on the interpreter that runs fedfill.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before opening port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group (signal 0 tests, sends nothing)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_left(process: subprocess.Popen) -> bool:
    """Whether any process of the group `process` leads (started with start_new_session) is
    left, never mistaking another group that took its number for it.

    Linux keeps a group's id from being reused while any member lives. Once the leader is
    reaped and the last member gone, the number is free, and a new process may take it as
    its pid and its own group's id: with pid_max at 32768, a day of tests wraps the pids
    several times. So a reaped leader whose pid a live process now has means our group is
    gone; signalling that number would hit someone else's processes. Where there is no
    /proc, the group id alone."""
    process.poll()  # reap the leader if it exited: a zombie still counts as a member
    left = group_alive(process.pid)
    if process.returncode is not None and Path(f"/proc/{process.pid}").exists():
        return False  # the number is another process's now
    return left


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End a component and every process in its group: SIGTERM, wait until the group is
    empty, SIGKILL what is left. A child may outlive its leader, so the group is waited
    for, not just the leader; a group already gone is left alone (see group_left)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_left(process):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            process.poll()
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not group_left(process):
                return
            time.sleep(0.1)


def write_flower_commands(bin_dir: Path) -> Path:
    """Flower's console scripts and fedfill's, bound to this interpreter, in `bin_dir`.

    Flower starts its children by name from PATH (flower-superlink -> flower-superexec ->
    flwr-serverapp, flwr-simulation; flower-supernode -> flwr-clientapp), and nodes start as
    `fedfill supernode` (client/supernode.py) by name too. An environment that
    reuses another's site-packages (a venv with --system-site-packages) has no such scripts
    of its own, so PATH would find the other interpreter's and its copy of fedfill. These run
    `sys.executable`, so every Flower process of a run imports what fedfill run imports.
    """
    from importlib.metadata import distribution

    bin_dir.mkdir(parents=True, exist_ok=True)
    for entry in [*distribution("flwr").entry_points, *distribution("fedfill").entry_points]:
        if entry.group != "console_scripts":
            continue
        script = bin_dir / entry.name
        # sh re-executes the file with Python (no shebang length limit); Python reads the
        # first two lines as a string expression.
        content = ("#!/bin/sh\n"
                   f"'''exec' {shlex.quote(sys.executable)} \"$0\" \"$@\"\n"
                   "' '''\n"
                   "import sys\n"
                   f"from {entry.module} import {entry.attr}\n"
                   f"sys.argv[0] = {entry.name!r}\n"
                   f"sys.exit({entry.attr}())\n")
        if script.is_file() and script.read_text() == content:
            continue
        # Written aside and moved in whole: processes started a moment ago may be reading the
        # script, and a script truncated under them runs as an empty one, exiting 0 with no
        # output: most likely what a SuperNode of the auth tests did twice in six CI runs.
        aside = script.with_name(f".{entry.name}.{os.getpid()}")
        aside.write_text(content)
        aside.chmod(0o755)
        os.replace(aside, script)
    return bin_dir


def flower_environment(home: Path) -> dict[str, str]:
    """The environment of every Flower process of a run: its own FLWR_HOME (FABs, config,
    logs stay in the run's directory), Flower's commands on this interpreter first on PATH,
    runtime dependency installation off (by default a SuperLink builds a fresh env with CUDA
    torch per run with `uv sync`), and no update check."""
    bin_dir = write_flower_commands(home / "bin")
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def node_config_arg(values: dict) -> str:
    """Flower's --node-config syntax: space-separated key=value, strings quoted."""
    parts = []
    for key, value in values.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value!r}")
    return " ".join(parts)


@dataclass
class _Components:
    """Flower processes, each a session leader with its log in log_dir, ended group by group;
    `address` is the SuperLink's, what `flwr run` connects to."""

    log_dir: Path
    env: dict[str, str] | None = None
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    superlink_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def _spawn(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        env = {**(self.env or {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}), **(extra_env or {})}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.log_dir,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def _start_superlink(self, timeout_s: float, *, simulation: bool) -> None:
        """A SuperLink and the SuperExec that runs its ServerApp (or simulation), both ours.

        With `--isolation subprocess` the SuperLink would start flower-superexec itself, in a
        session of its own that ending the SuperLink's group does not reach; with `process`
        we start it, in a group we end (Ray and the apps run under it). Runtime dependency
        installation stays off: the flag here, SuperExec's default, and flower_environment.
        Its state is Flower's in-memory one (no --database): a loopback federation lives as
        long as its run, nothing reopens it, and a SQLite file with its queries per request
        made every round slower (bench/bench_flower.py, 3 nodes: 3.2 -> 2.6 s of overhead).
        """
        port = self.superlink_port
        superlink = self._spawn("superlink", [
            "flower-superlink", *(["--simulation"] if simulation else []), "--isolation", "process", "--insecure",
            "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"])
        try:
            wait_for_port(port, timeout_s, superlink)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"the SuperLink did not start ({err}); see {self.log_dir / 'superlink.log'}") from None
        self._spawn("superexec", ["flower-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{port}",
                                  "--parent-pid", str(superlink.pid)])

    def check_alive(self) -> list[str]:
        """Names of components that have exited (a node that died is reported, not waited for)."""
        return [name for name, p in self.processes if p.poll() is not None]

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            stop_group(process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def supernode_command(clientapp: str = "warm") -> list[str]:
    """The command that starts a SuperNode: Flower's flower-supernode through `fedfill
    supernode` (client/supernode.py), flower-supernode's arguments to follow. `clientapp`
    "warm" forks each task's ClientApp from a process that imported Flower and the app once;
    "flower" is Flower's SuperNode as it ships."""
    return ["fedfill", "supernode", "--clientapp", clientapp]


@dataclass(frozen=True)
class KillAt:
    """`--kill-at NODE:ROUND:PHASE`: kill SuperNode `node` (its partition index) in `phase`
    (train or upload) of `server_round`."""

    node: int
    server_round: int
    phase: str

    def __str__(self) -> str:
        return f"{self.node}:{self.server_round}:{self.phase}"


@dataclass
class LocalFederation(_Components):
    """Flower's deployment engine: a SuperLink and N SuperNodes (warm ClientApps unless
    `clientapp` is "flower"); `address` is what `flwr run` connects to.

    `kill_at`: faults to inject. Each such node is asked to hold in that phase of that round
    (client/faults.py, through a file in the log directory); a thread watches its log for the
    hold line and then kills the node's process group with SIGKILL, as a crash or a power cut
    would end it, so the kill is known to have landed in the phase (the line quoted in
    `kills`, and in the log directory's kills.log)."""

    node_configs: list[dict] = field(default_factory=list)
    clientapp: str = "warm"
    kill_at: list[KillAt] = field(default_factory=list)
    kills: list[str] = field(default_factory=list)  # one line per kill done: when, which node, its hold line

    def start(self, timeout_s: float = 60.0) -> "LocalFederation":
        from client.faults import HOLD_FILE_ENV, write_hold

        self._start_superlink(timeout_s, simulation=False)
        for k, config in enumerate(self.node_configs):
            faults = [fault for fault in self.kill_at if fault.node == k]
            extra_env = {}
            if faults:  # one fault a node: it dies in it
                hold_file = self.log_dir / f"hold-supernode-{k}"
                write_hold(hold_file, faults[0].phase, faults[0].server_round)
                extra_env[HOLD_FILE_ENV] = str(hold_file)
            process = self._spawn(f"supernode-{k}", [
                *supernode_command(self.clientapp), "--insecure", "--superlink", self.address,
                "--port", str(free_port()), "--node-config", node_config_arg(config), "--max-wait-time", "120"],
                extra_env)
            if faults:
                threading.Thread(target=self._kill_when_holding, args=(faults[0], process), daemon=True,
                                 name=f"fedfill-kill-{k}").start()
        return self

    def _kill_when_holding(self, fault: KillAt, process: subprocess.Popen) -> None:
        from client.faults import wait_for_hold

        name = f"supernode-{fault.node}"
        line = wait_for_hold(self.log_dir / f"{name}.log", fault.phase, fault.server_round, math.inf,
                             alive=lambda: process.poll() is None)
        if line is None:  # the node ended first (the run is over, or it died on its own)
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        stop_group(process)  # reaps it, and anything of the group that outlived the signal
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # Flower's log colours
        record = f"{time.time():.3f} kill-at {fault}: killed {name}'s process group at: {line}"
        self.kills.append(record)
        with open(self.log_dir / "kills.log", "a") as kills:
            kills.write(record + "\n")
        print(f"  kill-at {fault}: killed {name} holding in {fault.phase} (see {self.log_dir / 'kills.log'})",
              flush=True)


@dataclass
class LocalSimulation(_Components):
    """Flower's simulation engine: a SuperLink with `--simulation` whose SuperExec runs the
    ServerApp and Ray's virtual SuperNodes; `address` is what `flwr run` connects to, and
    `flwr run --federation-config "num-supernodes=N ..."` sizes the federation.

    Started here rather than by `flwr run` with a ":local:" connection: that SuperLink is
    detached, outlives the run and installs the app's dependencies into a fresh environment
    per run (CUDA torch, ~5 GB); this one has that off and ends with the run.
    """

    def start(self, timeout_s: float = 90.0) -> "LocalSimulation":
        self._start_superlink(timeout_s, simulation=True)
        return self


@dataclass
class GenerationProcess:
    """`fedfill generator serve` as a separate process, up once its gRPC health check says so."""

    log_dir: Path
    cache_dir: Path
    checkpoint: str = ""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "GenerationProcess":
        return self.launch().wait_serving(timeout_s)

    def launch(self) -> "GenerationProcess":
        """Start the process and return at once (its imports and checkpoint take seconds that
        the caller can spend starting other things); `wait_serving` then waits for it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedfill", "generator", "serve", "--port", str(self.port),
                   "--cache", str(self.cache_dir)] + (["--checkpoint", self.checkpoint] if self.checkpoint else [])
        log = open(self.log_dir / "generator.log", "w")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.log_dir)
        return self

    def wait_serving(self, timeout_s: float = 120.0) -> "GenerationProcess":
        from generation.client import serving

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the generation service exited; see {self.log_dir / 'generator.log'}")
            if serving(self.address):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the generation service did not report SERVING within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
