"""Flower's deployment engine on this machine: a SuperLink and N SuperNodes as separate
processes on loopback, each in its own process group.

A SuperNode starts a `flower-superexec` child that outlives a plain kill of its parent, so
every component is a session leader and `stop` ends the whole group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a component and every child it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            # children may outlive the leader: one more signal to the group catches them
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def node_config_arg(values: dict) -> str:
    """Flower's --node-config syntax: space-separated key=value, strings quoted."""
    parts = []
    for key, value in values.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value!r}")
    return " ".join(parts)


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes; `address` is what `flwr run` connects to."""

    log_dir: Path
    node_configs: list[dict]
    superlink_port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes.append((name, process))
        return process

    def start(self, timeout_s: float = 60.0) -> "LocalFederation":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        superlink = self._spawn("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.superlink_port),
            "--database", str(self.log_dir / "superlink.db"), "--disable-runtime-dependency-installation"])
        wait_for_port(self.superlink_port, timeout_s, superlink)
        for k, config in enumerate(self.node_configs):
            self._spawn(f"supernode-{k}", [
                "flower-supernode", "--insecure", "--superlink", self.address, "--port", str(free_port()),
                "--node-config", node_config_arg(config), "--max-wait-time", "120"])
        return self

    def check_alive(self) -> list[str]:
        """Names of components that have exited (a node that died is reported, not waited for)."""
        return [name for name, p in self.processes if p.poll() is not None]

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            stop_group(process)

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
        import sys

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedfill", "generator", "serve", "--port", str(self.port),
                   "--cache", str(self.cache_dir)] + (["--checkpoint", self.checkpoint] if self.checkpoint else [])
        log = open(self.log_dir / "generator.log", "w")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the generation service exited; see {self.log_dir / 'generator.log'}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
            except grpc.RpcError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the generation service did not report SERVING within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
