"""The container testbed, driven with the Docker SDK: a SuperLink, a generation service and N
SuperNodes as containers on a user-defined bridge network, with TLS and SuperNode
authentication on, each node with its own key, device profile, CPU quota and shaped uplink.

Every container and the network carry the label `fedfill.testbed=<name>`, so `down` finds and
removes them all, also after a crash of the command that made them. What a testbed needs
between commands (ports, node ids, profiles) and its keys live in its state directory on the
host (never in an image or a report); keys reach a container as read-only bind mounts of the
single files it needs.

Mappings (stated, so that a reader can undo them):
- CPU quota: a node gets f_max / F_REF_HZ host cores (a 2 GHz device gets one core),
  at least MIN_CPUS.
- Uplink: each round the node's egress is shaped (tc tbf) to the plan's rate
  (model bits / T_com, as the cost model counts them) times `uplink_scale`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedfill.errors import UsageError

from .image import DEFAULT_IMAGE

LABEL = "fedfill.testbed"
ROLE_LABEL = "fedfill.role"
F_REF_HZ = 2e9
MIN_CPUS = 0.1
HOLD_FILE = "/tmp/fedfill-hold"  # a node's fault-injection request (client/faults.py), written by `kill --at`
SUPERLINK_PORT = 8000  # inside the network; published on loopback at the testbed's port
GENERATOR_PORT = 50051


def docker_client():
    """A client of a reachable Docker daemon, or a UsageError saying how to get one."""
    try:
        import docker
    except ImportError:
        raise UsageError("the testbed needs the Docker SDK for Python: pip install 'fedfill[testbed]'") from None
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as err:
        raise UsageError(f"no Docker daemon reachable ({str(err).splitlines()[0][:120]}); start one, e.g. as root: "
                         "apt-get install -y docker.io && dockerd &  (or set DOCKER_HOST)") from None
    return client


def state_root() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "fedfill" / "testbed"


def cpus_for(f_max_hz: float) -> float:
    return max(MIN_CPUS, round(f_max_hz / F_REF_HZ, 2))


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class NodeState:
    index: int
    container: str
    config: dict  # its --node-config: partition, and the device profile
    cpus: float
    node_id: int = 0  # the SuperLink's id for its registered key
    bundle: str = ""  # a board's bundle directory (add_board): the node runs the bundle's command
    mounts: dict = field(default_factory=dict)  # a board's host directories -> container paths


@dataclass
class TestbedState:
    name: str
    image: str
    port: int
    runs_dir: str
    network: str
    memory: str
    generator: bool
    nodes: list[NodeState] = field(default_factory=list)
    dataset: str = "digits"  # the embedded dataset whose shipped generator the service serves

    @classmethod
    def load(cls, path: Path) -> "TestbedState":
        data = json.loads(path.read_text())
        return cls(**{**data, "nodes": [NodeState(**n) for n in data["nodes"]]})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")


class Testbed:
    """One named testbed: its containers, network and state directory."""

    def __init__(self, name: str = "fedfill", client=None, state_dir: Path | None = None,
                 progress: Callable[[str], None] = print):
        self.name = name
        self.client = client or docker_client()
        self.dir = state_dir or state_root() / name
        self.progress = progress

    # ------------------------------------------------------------------ names
    @property
    def superlink(self) -> str:
        return f"{self.name}-superlink"

    @property
    def generator(self) -> str:
        return f"{self.name}-generator"

    def node(self, index: int) -> str:
        return f"{self.name}-node-{index}"

    @property
    def state_file(self) -> Path:
        return self.dir / "testbed.json"

    @property
    def flwr_home(self) -> Path:
        return self.dir / "flwr"

    def state(self) -> TestbedState:
        if not self.state_file.exists():
            raise UsageError(f"no testbed named {self.name!r} is up (no {self.state_file}); "
                             "start one with `fedfill testbed up`")
        return TestbedState.load(self.state_file)

    def containers(self) -> list:
        return self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.name}"})

    def _labels(self, role: str) -> dict:
        return {LABEL: self.name, ROLE_LABEL: role}

    # ------------------------------------------------------------------ up
    def up(self, node_configs: list[dict], *, image: str = DEFAULT_IMAGE, port: int = 9000,
           runs_dir: Path = Path("runs"), memory: str = "1g", generator: bool = True,
           timeout_s: float = 120.0, dataset: str = "digits") -> TestbedState:
        import docker

        from .pki import write_pki

        if self.containers():
            raise UsageError(f"a testbed named {self.name!r} is already up (`fedfill testbed status`; "
                             "`fedfill testbed down` first)")
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            raise UsageError(f"no image {image!r} in this Docker daemon; build it with `fedfill testbed build`") from None
        if not port_is_free(port):
            raise UsageError(f"port {port} on 127.0.0.1 is busy; pick another with --port")
        runs_dir = Path(runs_dir).resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / "superlink", ignore_errors=True)  # a fresh SuperLink state: no older registrations
        (self.dir / "superlink").mkdir()
        pki = write_pki(self.dir / "pki", len(node_configs), (self.superlink, "localhost", "127.0.0.1"))
        network = f"{self.name}-net"
        state = TestbedState(self.name, image, port, str(runs_dir), network, memory, generator,
                             [NodeState(k, self.node(k), config, cpus_for(float(config.get("f-max-hz", F_REF_HZ))))
                              for k, config in enumerate(node_configs)], dataset=dataset)
        state.save(self.state_file)
        try:
            self.client.networks.create(network, driver="bridge", labels=self._labels("network"))
            self._start_superlink(state, pki)
            if generator:
                self._start_generator(state)
            self._wait_superlink(state, timeout_s)
            self._register_nodes(state, pki)
            for node in state.nodes:
                self._start_node(state, node, pki)
            if generator:
                self._wait_healthy(self.generator, timeout_s)
        except BaseException:
            self.progress("testbed up failed: removing what it made")
            self.down(keep_state=True)
            raise
        state.save(self.state_file)
        return state

    def _user(self) -> str:
        """Containers run as the host's user: what they write to the runs directory is the user's."""
        return f"{os.getuid()}:{os.getgid()}"

    def _run(self, state: TestbedState, name: str, role: str, command: list[str], **kwargs):
        return self.client.containers.run(
            state.image, command, name=name, hostname=name, detach=True, network=state.network,
            labels=self._labels(role), user=self._user(), **kwargs)

    def _start_superlink(self, state: TestbedState, pki) -> None:
        mounts = {str(pki.ca_cert): {"bind": "/pki/ca.crt", "mode": "ro"},
                  str(pki.superlink_cert): {"bind": "/pki/superlink.crt", "mode": "ro"},
                  str(pki.superlink_key): {"bind": "/pki/superlink.key", "mode": "ro"},
                  str(self.dir / "superlink"): {"bind": "/state", "mode": "rw"},
                  # the ServerApp writes its report where the host reads it, at the same path
                  state.runs_dir: {"bind": state.runs_dir, "mode": "rw"}}
        # Flower's SuperLink whose SQLite state waits for its lock (server/superlink.py)
        self._run(state, self.superlink, "superlink", [
            "fedfill", "superlink", "--ssl-ca-certfile", "/pki/ca.crt", "--ssl-certfile", "/pki/superlink.crt",
            "--ssl-keyfile", "/pki/superlink.key", "--enable-supernode-auth", "--isolation", "subprocess",
            "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT), "--database", "/state/superlink.db",
            "--disable-runtime-dependency-installation"],
            volumes=mounts, ports={f"{SUPERLINK_PORT}/tcp": ("127.0.0.1", state.port)})

    def _start_generator(self, state: TestbedState) -> None:
        self._run(state, self.generator, "generator", [
            "fedfill", "generator", "serve", "--host", "0.0.0.0", "--port", str(GENERATOR_PORT),
            "--dataset", state.dataset, "--cache", "/tmp/generator-cache"],
            healthcheck={"test": ["CMD", "fedfill", "generator", "health", f"127.0.0.1:{GENERATOR_PORT}"],
                         "interval": 5_000_000_000, "timeout": 20_000_000_000, "retries": 3,
                         "start_period": 10_000_000_000})

    def _start_node(self, state: TestbedState, node: NodeState, pki) -> None:
        from .local import node_config_arg

        key = pki.node_private_key(node.index)
        self._run(state, node.container, "supernode", [  # Flower's SuperNode, warm (client/supernode.py)
            "fedfill", "supernode", "--root-certificates", "/pki/ca.crt", "--superlink", f"{self.superlink}:{SUPERLINK_PORT}",
            "--auth-supernode-private-key", "/pki/node.key", "--isolation", "subprocess",
            "--node-config", node_config_arg(node.config)],
            volumes={str(pki.ca_cert): {"bind": "/pki/ca.crt", "mode": "ro"},
                     str(key): {"bind": "/pki/node.key", "mode": "ro"}},
            environment={"FEDFILL_HOLD_FILE": HOLD_FILE},  # `kill --at` asks the node to hold there
            nano_cpus=int(node.cpus * 1e9), mem_limit=state.memory,
            # for `shape`'s root exec only: the node's own processes run as the host's user,
            # which holds the capability only when that user is root
            cap_add=["NET_ADMIN"])

    # ------------------------------------------------------------------ boards
    def board(self, bundle_name: str) -> str:
        return f"{self.name}-board-{bundle_name}"

    def add_board(self, bundle_dir: Path, mounts: dict[str, str] | None = None) -> NodeState:
        """A board without a board: a node container that runs exactly what a bundle
        (`fedfill board bundle`) runs on a board (its systemd unit's command line and
        environment, its key and CA at /etc/fedfill), with the host directories `mounts` maps
        to container paths (a copy of a board's sysfs tree where the bundle's `sysfs-root`
        points, the board's own data where its `data-dir` does). Its key is registered with
        the SuperLink first, as the operator's command would. The bundle must be made for this
        testbed: its SuperLink `{name}-superlink:8000` and this testbed's CA (`--pki` = the
        testbed's pki directory)."""
        from . import bundle as bundles
        from .flower_cli import AlreadyRegistered, register_supernode

        state = self.state()
        bundle_dir = Path(bundle_dir).resolve()
        command, environment, config = bundles.unit_command(bundle_dir)
        wanted = f"{self.superlink}:{SUPERLINK_PORT}"
        if environment.get("FEDFILL_SUPERLINK") != wanted:
            raise UsageError(f"bundle {bundle_dir} dials {environment.get('FEDFILL_SUPERLINK')!r}, this testbed's "
                             f"SuperLink is {wanted!r}: make it with `fedfill board bundle --superlink {wanted}`")
        if (bundle_dir / bundles.CA_CERT).read_bytes() != (self.dir / "pki" / "ca.crt").read_bytes():
            raise UsageError(f"bundle {bundle_dir} trusts another CA than this testbed's: make it with "
                             f"`fedfill board bundle --pki {self.dir / 'pki'}`")
        for host_path in mounts or {}:
            if not Path(host_path).exists():
                raise UsageError(f"nothing at {host_path} to mount into the board")
        name = self.board(bundle_dir.name)
        if any(node.container == name for node in state.nodes):
            raise UsageError(f"board {bundle_dir.name!r} is already in testbed {self.name!r}")
        node = NodeState(len(state.nodes), name, config, cpus_for(float(config.get("f-max-hz", F_REF_HZ))),
                         bundle=str(bundle_dir), mounts={str(Path(k).resolve()): v for k, v in (mounts or {}).items()})
        try:
            node.node_id = register_supernode(bundle_dir / bundles.PUBLIC_KEY, self.connect_cli(state))
        except AlreadyRegistered:
            raise UsageError(f"the SuperLink already holds board {bundle_dir.name!r}'s key: is it in another "
                             "testbed of this SuperLink?") from None
        self.progress(f"  registered board {bundle_dir.name}'s key: node id {node.node_id}")
        state.nodes.append(node)
        state.save(self.state_file)
        self._start_board(state, node, command, environment)
        return node

    def _start_board(self, state: TestbedState, node: NodeState, command: list[str], environment: dict) -> None:
        from . import bundle as bundles

        volumes = {str(Path(node.bundle) / f): {"bind": f"{bundles.ETC}/{f}", "mode": "ro"}
                   for f in (bundles.PRIVATE_KEY, bundles.CA_CERT, bundles.NODE_ENV)}
        volumes.update({host: {"bind": target, "mode": "ro"} for host, target in node.mounts.items()})
        self._run(state, node.container, "board", command, environment=environment, volumes=volumes,
                  nano_cpus=int(node.cpus * 1e9), mem_limit=state.memory, cap_add=["NET_ADMIN"])

    def _wait_superlink(self, state: TestbedState, timeout_s: float) -> None:
        """Until the SuperLink completes a TLS handshake with our CA on its published port
        (Docker's proxy accepts TCP connections before the SuperLink listens)."""
        import ssl

        context = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        context.set_alpn_protocols(["h2"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            container = self.client.containers.get(self.superlink)
            if container.status == "exited":
                raise RuntimeError(f"the SuperLink container exited:\n{self.logs(self.superlink, 15)}")
            try:
                with socket.create_connection(("127.0.0.1", state.port), timeout=2) as raw, \
                        context.wrap_socket(raw, server_hostname="localhost"):
                    return
            except (OSError, ssl.SSLError):
                time.sleep(0.5)
        raise TimeoutError(f"the SuperLink did not answer TLS on 127.0.0.1:{state.port} within {timeout_s:.0f} s; "
                           f"its log:\n{self.logs(self.superlink, 15)}")

    def _wait_healthy(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            container = self.client.containers.get(name)
            health = container.attrs["State"].get("Health", {}).get("Status")
            if container.status == "exited":
                raise RuntimeError(f"{name} exited:\n{self.logs(name, 15)}")
            if health == "healthy":
                return
            time.sleep(1.0)
        raise TimeoutError(f"{name} was not healthy within {timeout_s:.0f} s")

    def connect_cli(self, state: TestbedState) -> Path:
        """The host's flwr CLI connection to this testbed's SuperLink (TLS, our CA)."""
        from .flower_cli import write_flwr_connection

        write_flwr_connection(self.flwr_home, f"127.0.0.1:{state.port}", root_certificates=self.dir / "pki" / "ca.crt")
        return self.flwr_home

    def _register_nodes(self, state: TestbedState, pki) -> None:
        from .flower_cli import register_supernode

        home = self.connect_cli(state)
        for node in state.nodes:
            node.node_id = register_supernode(pki.node_public_key(node.index), home)
            self.progress(f"  registered {node.container}'s key: node id {node.node_id}")

    def ensure_running(self, state: TestbedState, timeout_s: float = 120.0) -> None:
        """Start the SuperLink and the generation service again if they are down (after a
        crash or a kill): their state (registrations, runs) is on the host, so a resumed run
        finds the nodes it knew. Nodes are left as they are: their restarts are the user's."""
        for name in (self.superlink, *([self.generator] if state.generator else [])):
            container = self._container(name)
            if container.status != "running":
                self.progress(f"  {name} was {container.status}: starting it")
                container.start()
        self._wait_superlink(state, timeout_s)
        if state.generator:
            self._wait_healthy(self.generator, timeout_s)

    def stopped_nodes(self, state: TestbedState) -> list[str]:
        """The node containers that are not running (a run reports each once and goes on)."""
        return [n.container for n in state.nodes if self._status(n.container) != "running"]

    def runs_in_flight(self) -> list[int]:
        """The SuperLink's unfinished runs, so that `down` does not end one unasked; [] when
        there is no testbed or SuperLink to ask (then nothing can be running)."""
        from .flower_cli import active_runs

        if not self.state_file.exists() or self._status(self.superlink) != "running":
            return []
        try:
            return active_runs(self.connect_cli(self.state()), timeout_s=30.0)
        except RuntimeError as err:
            self.progress(f"  could not list the SuperLink's runs: {err}")
            return []

    def stop_runs(self, state: TestbedState, wait_s: float = 0.0) -> list[int]:
        """Stop the runs still running on the SuperLink (a driver that died leaves its ServerApp
        going), waiting up to `wait_s` until none is; returns their ids."""
        from .flower_cli import active_runs, stop_active_runs

        home = self.connect_cli(state)
        try:
            stopped = stop_active_runs(home)
            deadline = time.monotonic() + wait_s
            while stopped and time.monotonic() < deadline and set(stopped) & set(active_runs(home)):
                time.sleep(1.0)
            return stopped
        except RuntimeError as err:  # the SuperLink may be the thing that is down
            self.progress(f"  could not list the SuperLink's runs: {err}")
            return []

    # ------------------------------------------------------------------ shaping
    def shape(self, container_name: str, rate_bps: float) -> None:
        """Shape a node's egress (its uplink) to `rate_bps` with a token bucket (tc tbf), by an
        exec as root in the node container (it has NET_ADMIN for this)."""
        rate = max(8_000, int(rate_bps))
        burst = max(16_000, rate // 8 // 50)  # ~20 ms of traffic, at least a few packets
        command = ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{rate}bit",
                   "burst", str(burst), "latency", "2s"]
        result = self.client.containers.get(container_name).exec_run(command, user="root")
        if result.exit_code != 0:
            output = result.output.decode(errors="replace").strip()
            hint = " (the image has no tc: its base image needs iproute2)" if "executable file not found" in output else ""
            raise RuntimeError(f"shaping {container_name} failed{hint}: {output}")

    def shaped_rate(self, container_name: str) -> str:
        result = self.client.containers.get(container_name).exec_run(["tc", "qdisc", "show", "dev", "eth0"])
        for word_index, word in enumerate(words := result.output.decode(errors="replace").split()):
            if word == "rate" and word_index + 1 < len(words):
                return words[word_index + 1]
        return "unshaped"

    # ------------------------------------------------------------------ faults and status
    def kill(self, names: list[str] | None = None, fraction: float = 0.0, seed: int | None = None,
             at: str | None = None, wait_s: float = 300.0) -> list[str]:
        """Kill the named containers, or a random `fraction` of the running nodes (at least one).

        `at` (train or upload): each node is first asked to hold in that phase of its next
        round (client/faults.py, through HOLD_FILE in its container), and killed once its log
        shows it holding there, so the kill lands in that phase; `holds` keeps each node's
        line. UsageError when a node does not get there within `wait_s` (no run going on)."""
        if not names:
            running = [n.container for n in self.state().nodes if self._status(n.container) == "running"]
            if not running:
                raise UsageError("no node is running")
            count = max(1, round(fraction * len(running)))
            names = sorted(random.Random(seed).sample(running, min(count, len(running))))
        if at is not None:
            self.holds = {name: self._kill_holding(name, at, wait_s) for name in names}
            return names
        for name in names:
            self._container(name).kill()
        return names

    def _kill_holding(self, name: str, phase: str, wait_s: float) -> str:
        from client.faults import HOLD_FILE_ENV, find_hold

        container = self._container(name)
        if container.labels.get(ROLE_LABEL) != "supernode":
            raise UsageError(f"--at {phase}: {container.name} is no SuperNode of this testbed")
        if f"{HOLD_FILE_ENV}={HOLD_FILE}" not in container.attrs["Config"].get("Env", []):
            raise UsageError(f"--at {phase}: {container.name} was started without {HOLD_FILE_ENV} (a testbed made by "
                             "an older fedfill): `down` and `up` it again")
        since = int(time.time()) - 1
        asked = container.exec_run(["sh", "-c", f"printf '{phase} next\\n' > {HOLD_FILE}"])
        if asked.exit_code != 0:
            raise RuntimeError(f"could not ask {container.name} to hold: {asked.output.decode(errors='replace')}")
        self.progress(f"{container.name}: asked to hold in {phase} of its next round; killing it when it does")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            line = find_hold(container.logs(since=since).decode(errors="replace"), phase, None)
            if line:
                container.kill()
                return re.sub(r"\x1b\[[0-9;]*m", "", line)
            container.reload()
            if container.status != "running":
                raise UsageError(f"{container.name} stopped before it reached {phase}")
            time.sleep(0.2)
        container.exec_run(["rm", "-f", HOLD_FILE])
        raise UsageError(f"--at {phase}: {container.name} did not reach {phase} within {wait_s:.0f} s (is a run "
                         "going on? `fedfill testbed run`); nothing was killed")

    def restart(self, names: list[str]) -> None:
        for name in names:
            self._container(name).restart(timeout=5)

    def _container(self, name: str):
        import docker

        full = name if name.startswith(f"{self.name}-") else f"{self.name}-{name}"
        try:
            return self.client.containers.get(full)
        except docker.errors.NotFound:
            known = ", ".join(c.name for c in self.containers()) or "none"
            raise UsageError(f"no container {full!r} in testbed {self.name!r} (it has: {known})") from None

    def _status(self, name: str) -> str:
        try:
            return self.client.containers.get(name).status
        except Exception:  # noqa: BLE001 - gone is a status too
            return "missing"

    def status(self) -> list[dict]:
        """One row per container: role, state (with the reason of a refused node), CPU quota,
        memory limit, node id, and the rate its uplink is shaped to."""
        from .flower_cli import REFUSALS, supernode_refusal

        state = self.state()
        nodes = {n.container: n for n in state.nodes}
        rows = []
        for container in sorted(self.containers(), key=lambda c: c.name):
            attrs = container.attrs
            code = attrs["State"].get("ExitCode", 0)
            condition = container.status
            if condition == "exited":
                refusal = supernode_refusal(self.logs(container.name, 40))
                condition = f"exited {code}" + (f" (refused, {refusal}: {REFUSALS[refusal]})" if refusal else "")
            health = attrs["State"].get("Health", {}).get("Status")
            if health:
                condition += f", {health}"
            node = nodes.get(container.name)
            rows.append({"container": container.name, "role": container.labels.get(ROLE_LABEL, "?"),
                         "state": condition,
                         "cpus": (attrs["HostConfig"].get("NanoCpus") or 0) / 1e9 or None,
                         "memory": attrs["HostConfig"].get("Memory") or None,
                         "node_id": node.node_id if node else None,
                         "partition": node.config.get("partition-id") if node else None,
                         "uplink": self.shaped_rate(container.name) if node and container.status == "running" else ""})
        return rows

    def logs(self, name: str, lines: int = 20) -> str:
        return self._container(name).logs(tail=lines).decode(errors="replace")

    # ------------------------------------------------------------------ down
    def down(self, keep_state: bool = False) -> list[str]:
        """Remove every container and network labelled with this testbed's name (also those of
        a command that crashed), then its state directory. Returns what it removed."""
        removed = []
        for container in self.containers():
            container.remove(force=True, v=True)
            removed.append(container.name)
        for network in self.client.networks.list(filters={"label": f"{LABEL}={self.name}"}):
            network.remove()
            removed.append(network.name)
        for volume in self.client.volumes.list(filters={"label": f"{LABEL}={self.name}"}):
            volume.remove(force=True)
            removed.append(volume.name)
        if not keep_state and self.dir.exists():
            shutil.rmtree(self.dir)
        return removed
