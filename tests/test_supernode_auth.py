"""SuperNode authentication for real, on loopback: a TLS SuperLink with
`--enable-supernode-auth` (certificates and keys from deploy/pki.py), node-0's public key
registered with the real `flwr supernode register`, then four SuperNodes at once: node-0
(registered) comes online; node-1 (a valid key nobody registered), a node with no key, and a
plaintext node are turned away.

What Flower 1.41 does (observed): a refused SuperNode exits with status 1 and logs Flower's
"Exit Code: 305" (SUPERNODE_CONNECTION_ERROR) with the SuperLink's reason: "[code: 2004] Failed
to activate SuperNode." for an unregistered key, "[code: 2001] SuperNode authentication is
enabled. All SuperNodes must be registered via the CLI." for none. A plaintext node gets
"Server disconnected without sending a response." on each try and gives up after
--max-wait-time. SuperLink and SuperNodes run with `--isolation process` (no SuperExec: none is
needed to connect, and they start faster). About 25 s on 2 cores.
"""

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.flower_cli import (
    AlreadyRegistered,
    list_supernodes,
    register_supernode,
    supernode_refusal,
    write_flwr_connection,
)
from deploy.local import flower_environment, free_port, group_left, stop_group, wait_for_port
from deploy.pki import Pki, write_pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

START_S = 60.0  # a Flower process starts in 3-15 s on 2 cores with several starting at once
PLAINTEXT_WAIT_S = 8  # the plaintext node's --max-wait-time


@dataclass
class Bed:
    pki: Pki
    home: Path
    address: str
    superlink_log: Path
    node_id: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.home.parent / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=flower_environment(self.home),
                                       cwd=self.home.parent, start_new_session=True)
        self.processes[name], self.logs[name] = process, log
        return process

    def supernode(self, name: str, *extra: str) -> subprocess.Popen:
        return self.spawn(name, ["flower-supernode", "--superlink", self.address, "--port", str(free_port()),
                                 "--isolation", "process", *extra])

    def wait_exit(self, name: str, timeout_s: float = START_S) -> tuple[int, str]:
        """The node's exit status and log once it exited, within timeout_s."""
        process = self.processes[name]
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still runs after {timeout_s:.0f} s:\n{self.logs[name].read_text()[-3000:]}")
        return code, self.logs[name].read_text(errors="replace")


def _wait_for_line(log: Path, pattern: str, timeout_s: float, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if match := re.search(pattern, text):
            return match.group(0)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} in {log.name} after {timeout_s:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    pki = write_pki(root / "pki", 2, ("superlink", "localhost", "127.0.0.1"))
    port = free_port()
    bed = Bed(pki=pki, home=root / "flwr", address=f"127.0.0.1:{port}", superlink_log=root / "superlink.log")
    try:
        superlink = bed.spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.superlink_cert),
            "--ssl-keyfile", str(pki.superlink_key), "--enable-supernode-auth", "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(root / "state.db"),
            "--disable-runtime-dependency-installation"])
        wait_for_port(port, START_S, superlink)
        write_flwr_connection(bed.home, bed.address, root_certificates=pki.ca_cert)
        bed.node_id = register_supernode(pki.node_public_key(0), bed.home, "fedfill", timeout_s=START_S)
        # All four at once: they share the 2 cores' start-up time.
        tls = ["--root-certificates", str(pki.ca_cert)]
        bed.supernode("registered", *tls, "--auth-supernode-private-key", str(pki.node_private_key(0)))
        bed.supernode("unregistered", *tls, "--auth-supernode-private-key", str(pki.node_private_key(1)))
        bed.supernode("keyless", *tls)
        bed.supernode("plaintext", "--insecure", "--max-wait-time", str(PLAINTEXT_WAIT_S))
        yield bed
    finally:
        for process in reversed(bed.processes.values()):
            stop_group(process)
        left = [name for name, process in bed.processes.items() if group_left(process)]
        assert not left, f"processes left running: {left}"


def test_registration_returns_a_node_id(testbed):
    assert testbed.node_id > 0
    config = (testbed.home / "config.toml").read_text()
    assert f'root-certificates = "{testbed.pki.ca_cert.resolve()}"' in config and "insecure" not in config
    with pytest.raises(AlreadyRegistered, match="Public key already in use"):  # Flower's error 23
        register_supernode(testbed.pki.node_public_key(0), testbed.home, timeout_s=START_S)


def test_registered_node_comes_online(testbed):
    activated = _wait_for_line(testbed.superlink_log, rf"\[Fleet\.ActivateNode\] Activated node_id={testbed.node_id}\b",
                               START_S, testbed.processes["superlink"])
    assert activated
    assert testbed.processes["registered"].poll() is None, testbed.logs["registered"].read_text()
    assert f"SuperNode ID: {testbed.node_id}" in testbed.logs["registered"].read_text()
    nodes = {int(n["node-id"]): n["status"] for n in list_supernodes(testbed.home, timeout_s=START_S)}
    assert nodes == {testbed.node_id: "online"}  # none of the refused nodes is known


def test_unregistered_key_is_refused(testbed):
    code, log = testbed.wait_exit("unregistered")
    assert code == 1, log  # Flower exits 1 for every error; its own code is in the log
    assert "Exit Code: 305" in log and "[code: 2004] Failed to activate SuperNode." in log, log
    assert supernode_refusal(log) == 2004
    assert "SuperNode ID:" not in log
    superlink = testbed.superlink_log.read_text(errors="replace")
    assert "[ApiError:2004]" in superlink and "No SuperNode found with the given public key." in superlink


def test_node_without_key_is_refused(testbed):
    code, log = testbed.wait_exit("keyless")
    assert code == 1, log
    assert "Exit Code: 305" in log, log
    assert ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."
            in log), log
    assert supernode_refusal(log) == 2001
    assert "[/v1/fleet/register-node][ApiError:2001]" in testbed.superlink_log.read_text(errors="replace")


def test_plaintext_node_does_not_connect(testbed):
    # TLS handshake never happens: each try fails, the node gives up after --max-wait-time.
    code, log = testbed.wait_exit("plaintext", START_S + PLAINTEXT_WAIT_S)
    assert code == 1, log
    assert re.search(r"Giving up reconnection after [0-9.]+ seconds", log), log
    assert "Exit Code: 305" in log and "Server disconnected without sending a response." in log, log
    assert "SuperNode ID:" not in log and supernode_refusal(log) is None
