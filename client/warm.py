"""A warm ClientApp: Flower's own `flwr-clientapp`, forked from a process that imported it once.

For every message, Flower's SuperExec starts `flwr-clientapp --runtime-api-address A --token
T ...` by name from PATH, and each such process imports Flower (~1.3-2.6 s here) and torch
(~1.3-3 s) again before the app runs; three nodes on two cores import at once. Flower 1.41's
`flwr-clientapp` serves exactly one task (its token) and exits, so a long-lived one is not an
option; its warm executor pools are Kubernetes-only. This module keeps Flower's process per
task and removes the imports from it:

- the fork-server (`serve`) imports Flower's ClientApp runtime and the app's modules once,
  then waits on a Unix socket and never runs a task itself;
- the shim (`shim`), installed first on PATH as `flwr-clientapp` by `fedfill supernode`,
  sends its arguments, working directory, environment and standard streams (as file
  descriptors) to the fork-server, which forks a child that runs Flower's `flwr_clientapp()`
  with them; the shim waits and exits with the child's status.

Isolation is Flower's, per task: each task is a fresh fork of a parent that never ran one, so
no module cache, RNG or torch state passes from one task to the next (what a node keeps is
Flower's Context, through Flower's runtime API, as before); a crash ends only its child; a
signal to the shim goes to the child, and a shim that dies takes its child with it. When no
fork-server answers, the shim runs Flower's `flwr-clientapp` in its own process, cold: the
task is slower, never lost. `fedfill supernode` restarts a fork-server that died.

The parent must stay fork-safe: it imports only, and starts no thread, CUDA context or
network channel of its own (import side effects such as OpenBLAS's pool are fork-aware).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

SOCKET_ENV = "FEDFILL_WARM_SOCKET"  # the fork-server's Unix socket, for the shim
PRELOAD_ENV = "FEDFILL_WARM_PRELOAD"  # extra modules to import once, comma-separated
#: Flower's entry point of `flwr-clientapp` (flwr 1.41's console script): what a task runs
FLOWER_CLIENTAPP = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
ENTRY_ENV = "FEDFILL_WARM_ENTRY"  # another module:function for a task to run (the tests' own)
_HEADER = struct.Struct("!I")  # length of the JSON request that follows
_MAX_REQUEST = 1 << 20
_PIPE_ATOMIC = 4096  # a write up to PIPE_BUF lands whole


# ---------------------------------------------------------------------- both sides
def _entry():
    """The function a task runs: Flower's flwr-clientapp, unless the environment names another."""
    module, _, attribute = os.environ.get(ENTRY_ENV, FLOWER_CLIENTAPP).partition(":")
    return getattr(importlib.import_module(module), attribute)


def _exit_code(status_code: int) -> int:
    """os.waitstatus_to_exitcode's value as a shell shows it: 128 + N for signal N."""
    return 128 - status_code if status_code < 0 else status_code


# ---------------------------------------------------------------------- fork-server
def preload(name: str) -> None:
    """Import one module for the children; a failure is reported, not fatal (a task without
    it imports it itself, and fails there the way it would anyway)."""
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        print(f"fedfill warm: not preloaded: {name} ({type(err).__name__}: {err})", file=sys.stderr, flush=True)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: a length-prefixed JSON object {argv, cwd, env}, with the shim's standard
    streams as file descriptors on its first bytes."""
    data, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
    if not data and not fds:
        raise EOFError  # a probe: connected and closed (`fedfill supernode` waiting for us)
    if len(data) < _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request needs its length, its JSON and three file descriptors")
    (length,) = _HEADER.unpack_from(data)
    if length > _MAX_REQUEST:
        raise ValueError(f"request of {length} bytes")
    body = data[_HEADER.size:]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    return json.loads(body), fds


def _run_child(request: dict, fds: list[int], inherited: list, report: int, on_demand: list[str]) -> None:
    """In the forked child: become the shim's process (its streams, directory, environment,
    arguments, default signals) and run Flower's flwr-clientapp; at the end, tell the parent
    through `report` which of the `on_demand` modules the task imported. Never returns."""
    code = 1
    try:
        for resource in inherited:  # the server's sockets and the other children's report pipes
            resource.close() if isinstance(resource, socket.socket) else os.close(resource)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["flwr-clientapp", *request["argv"]]
        _entry()()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - the task's failure, shown on its own stderr
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001,S110 - the reader may be gone
                pass
        try:
            os.write(report, "\n".join(m for m in on_demand if m in sys.modules).encode()[:_PIPE_ATOMIC])
        except OSError:
            pass
        os._exit(code)


class ForkServer:
    """Accepts shims on `path`, forks a child per request, reports its pid and exit status.

    One thread: a selector over the listening socket, the shims' connections (EOF = the shim
    died: its child is killed) and each child's pidfd (readable when it exits). The
    `on_demand` modules are imported here only once a task has imported them (each child says
    which, through a pipe, as it ends), one at a time while no task is asked for: a node whose
    jobs never need diffusers never spends its ~5 s on it, one that does pays it once.
    """

    def __init__(self, path: str, parent_pid: int | None = None, on_demand: list[str] | None = None):
        self.path = path
        self.parent_pid = parent_pid
        self.on_demand = list(on_demand or [])  # not imported yet; wanted once a task imports one
        self.wanted: list[str] = []  # imported one at a time while no task is asked for
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int, int]] = {}  # pid -> (shim connection, pidfd, report pipe)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stopping = False

    def serve(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a dead server's socket
        self.listener.bind(self.path + ".new")
        os.chmod(self.path + ".new", 0o600)  # the node's user only
        self.listener.listen(64)
        os.replace(self.path + ".new", self.path)  # shims see a socket only once it accepts
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            while not self.stopping:
                events = self.selector.select(timeout=0 if self.wanted else 1.0)
                if not events and self.wanted:
                    preload(self.wanted.pop(0))
                for key, _ in events:
                    kind, pid = key.data
                    if kind == "accept":
                        self._accept()
                    elif kind == "exited":
                        self._reap(pid)
                    else:  # the shim's connection is readable: it died (it never writes again)
                        self.selector.unregister(key.fileobj)
                        self._kill(pid, signal.SIGKILL)
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    break  # the SuperNode wrapper is gone: so are we
        finally:
            for pid in list(self.children):
                self._kill(pid, signal.SIGTERM)
            if os.path.exists(self.path):
                os.unlink(self.path)

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = _read_request(conn)
        except EOFError:
            conn.close()
            return
        except (OSError, ValueError) as err:
            print(f"fedfill warm: refused a request: {err}", file=sys.stderr, flush=True)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            inherited = [self.listener, conn, report_read, *(r for c, _, r in self.children.values()),
                         *(c for c, _, _ in self.children.values())]
            _run_child(request, fds, inherited, report_write, self.on_demand)
        os.close(report_write)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (conn, pidfd, report_read)
        self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("shim", pid))
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:
            self._kill(pid, signal.SIGKILL)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self, pid: int) -> None:
        conn, pidfd, report = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        imported = os.read(report, _PIPE_ATOMIC).decode(errors="replace").split()  # the child is gone: all there
        os.close(report)
        for name in imported:
            if name in self.on_demand:
                self.on_demand.remove(name)
                self.wanted.append(name)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        if conn in (key.fileobj for key in self.selector.get_map().values()):
            self.selector.unregister(conn)
        try:
            conn.sendall(f"exit {_exit_code(os.waitstatus_to_exitcode(status))}\n".encode())
        except OSError:
            pass  # the shim is gone
        conn.close()


def serve(path: str, modules: list[str], parent_pid: int | None = None, first: int | None = None) -> None:
    """Import Flower's ClientApp runtime and the first `first` of `modules` (None: all), then
    serve; the rest are imported once a task has needed them (ForkServer)."""
    first = len(modules) if first is None else first
    started = time.monotonic()
    for name in [FLOWER_CLIENTAPP.partition(":")[0], *modules[:first]]:
        preload(name)
    print(f"fedfill warm: imported Flower's ClientApp and {', '.join(modules[:first]) or 'nothing else'} in "
          f"{time.monotonic() - started:.1f} s; serving on {path}", file=sys.stderr, flush=True)
    ForkServer(path, parent_pid, on_demand=modules[first:]).serve()


# ---------------------------------------------------------------------- shim
def shim(argv: list[str]) -> int:
    """`flwr-clientapp ARGS`: run by the fork-server when one answers, else in this process."""
    path = os.environ.get(SOCKET_ENV, "")
    conn = _connect(path) if path else None
    if conn is None:
        sys.argv = ["flwr-clientapp", *argv]
        _entry()()  # Flower's own, cold
        return 0
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
    reader = conn.makefile("r")
    first = reader.readline().split()
    if first[:1] != ["pid"]:
        print("fedfill warm: the fork-server did not start the task", file=sys.stderr)
        return 1
    child = int(first[1])

    def forward(signum, frame) -> None:  # SuperExec or a user stopping the task: the child is the task
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    last = reader.readline().split()
    if last[:1] == ["exit"]:
        return int(last[1])
    forward(signal.SIGKILL, None)  # the fork-server died under the task: it does not outlive this shim
    print("fedfill warm: the fork-server ended before the task did", file=sys.stderr)
    return 1


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shim"]:  # everything after it is flwr-clientapp's, untouched by argparse
        return shim(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m client.warm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve", help="import once, then fork a flwr-clientapp per shim")
    server.add_argument("--socket", required=True)
    server.add_argument("--preload", default="", help="modules to import once, comma-separated")
    server.add_argument("--first", type=int, default=None, help="how many of them to import before serving (default: "
                                                                "all); the rest once a task has imported them")
    server.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    sub.add_parser("shim", help="run flwr-clientapp with the arguments that follow")
    args = parser.parse_args(argv)
    serve(args.socket, [m for m in args.preload.split(",") if m], args.parent_pid, args.first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
