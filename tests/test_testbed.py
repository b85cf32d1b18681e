"""The container testbed, for real: the image built offline, a SuperLink with TLS and SuperNode
authentication, nodes with keys, quotas and shaped uplinks, the FIMI job across them, faults,
and `down` leaving nothing. Needs a Docker daemon (`.ci/run` starts one where it can); skips,
saying why, where none is reachable.

One testbed serves the module (bringing one up costs a minute); the tests run in file order.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
NAME = f"fftest{os.getpid()}"
NODES = 4  # 30% of them is one node

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _client():
    try:
        from deploy.testbed import docker_client
        from fedfill.errors import UsageError

        return docker_client()
    except UsageError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def client():
    return _client()


@pytest.fixture(scope="module")
def image(client):
    """The testbed image, built offline (layers and wheelhouse cached: seconds when unchanged)."""
    from deploy.image import build_image

    build_image(client, "fedfill:testbed", progress=lambda line: print(line, flush=True))
    return "fedfill:testbed"


@pytest.fixture(scope="module")
def xdg_state(tmp_path_factory) -> Path:
    """XDG_STATE_HOME of the test's testbeds, for this process and the CLI's alike."""
    return tmp_path_factory.mktemp("xdg-state")


@pytest.fixture(scope="module")
def testbed(client, image, xdg_state, tmp_path_factory):
    from deploy.testbed import Testbed
    from commands.run import node_configs

    runs = tmp_path_factory.mktemp("runs")
    bed = Testbed(NAME, client, state_dir=xdg_state / "fedfill" / "testbed" / NAME)
    try:
        # no generation service here (it costs each round more CPU than the nodes on CI's two
        # cores); the second testbed below starts one and waits for its health check
        bed.up(node_configs(NODES, None, profiles_always=True), image=image, port=free_port(),
               runs_dir=runs, memory="1g", generator=False)
        yield bed
    finally:
        bed.down()
        _assert_nothing_left(client)


def _assert_nothing_left(client) -> None:
    from deploy.testbed import LABEL

    assert client.containers.list(all=True, filters={"label": f"{LABEL}={NAME}"}) == []
    assert client.networks.list(filters={"label": f"{LABEL}={NAME}"}) == []


def _fedfill(xdg_state: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "XDG_STATE_HOME": str(xdg_state), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fedfill", "testbed", "--name", NAME, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_the_compose_file_validates():
    """docker-compose.yml against the compose client there is (v2 plugin or 1.29)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            done = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            return
    pytest.skip("no compose client (docker compose or docker-compose) here")


def test_nodes_come_up_registered_with_quotas_and_no_keys_in_the_image(testbed, client):
    from deploy.testbed import cpus_for

    state = testbed.state()
    rows = {row["container"]: row for row in testbed.status()}
    for node in state.nodes:
        row = rows[node.container]
        assert row["state"] == "running", row
        assert node.node_id > 0
        assert row["cpus"] == pytest.approx(cpus_for(float(node.config["f-max-hz"])))
        assert row["memory"] == 2**30
    # keys reach containers as bind mounts of single files, never through the image
    command = ["grep", "-rlI", *_secret_patterns(testbed), "/", "--exclude-dir=proc", "--exclude-dir=sys",
               "--exclude-dir=dev"]
    found = client.containers.run(state.image, ["sh", "-c", '"$@" || true', "sh", *command],
                                  remove=True, network_mode="none", stderr=False)
    assert found.decode().strip() == ""


def _secret_patterns(testbed) -> list[str]:
    """grep -e patterns only this testbed's secrets match: a line from the middle of the CA's
    certificate, the SuperLink's private key and a node's private key (the PEM headers alone
    would match libraries that parse keys, such as cryptography's ssh.py)."""
    patterns = []
    for name in ("ca.crt", "superlink.key", "nodes/node-0.key"):
        lines = (testbed.dir / "pki" / name).read_text().splitlines()
        patterns += ["-e", lines[len(lines) // 2]]
    return patterns


def test_an_unregistered_node_is_refused(testbed, client):
    """A node with a valid key the SuperLink never registered is refused: the SuperLink's code
    2004 in its log (Flower's exit status is 1 whatever the reason)."""
    from deploy.flower_cli import supernode_refusal
    from deploy.pki import write_pki

    state = testbed.state()
    pki = write_pki(testbed.dir / "pki", NODES + 1, (testbed.superlink, "localhost", "127.0.0.1"))
    rogue = client.containers.run(
        state.image, ["flower-supernode", "--root-certificates", "/pki/ca.crt", "--superlink",
                      f"{testbed.superlink}:8000", "--auth-supernode-private-key", "/pki/node.key"],
        name=f"{NAME}-rogue", detach=True, network=state.network, labels={"fedfill.testbed": NAME},
        volumes={str(pki.ca_cert): {"bind": "/pki/ca.crt", "mode": "ro"},
                 str(pki.node_private_key(NODES)): {"bind": "/pki/node.key", "mode": "ro"}},
        user=f"{os.getuid()}:{os.getgid()}")
    try:
        result = rogue.wait(timeout=90)
        log = rogue.logs().decode(errors="replace")
        assert result["StatusCode"] == 1 and supernode_refusal(log) == 2004, log
        print(log)
    finally:
        rogue.remove(force=True)


def test_a_plaintext_node_is_refused(testbed, client):
    """The SuperLink speaks TLS only: an --insecure node never gets on (it gives up or keeps
    failing to connect; it is never listed online)."""
    state = testbed.state()
    node = client.containers.run(
        state.image, ["flower-supernode", "--insecure", "--superlink", f"{testbed.superlink}:8000",
                      "--max-retries", "2", "--max-wait-time", "20"],
        name=f"{NAME}-plain", detach=True, network=state.network, labels={"fedfill.testbed": NAME},
        user=f"{os.getuid()}:{os.getgid()}")
    try:
        result = node.wait(timeout=90)
        log = node.logs().decode(errors="replace")
        assert result["StatusCode"] != 0, log
    finally:
        node.remove(force=True)


def test_a_run_survives_killing_30_percent_of_the_nodes_and_they_rejoin(testbed, xdg_state):
    state = testbed.state()
    out = Path(state.runs_dir) / "faults"
    # 8 rounds: with warm nodes a round takes seconds, and a restarted node needs some to rejoin
    # (its container, its fork-server's imports, its registration). A node killed mid-upload
    # leaves a reply whose objects never all arrive; the ServerApp gives up on it once the node
    # is offline (20 s after its last heartbeat, server/timed_grid.py), not when Flower's 180 s
    # object-push session expires, so a reply timeout under 180 s loses no healthy update.
    driver = _fedfill(xdg_state, "run", "--rounds", "8", "--out", str(out), "--reply-timeout-s", "120",
                      "--node-wait-s", "30")
    killed: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while not (out / "plan_round_2.json").exists():
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # mid-round: the nodes have their models and train
        killed = testbed.kill(fraction=0.3, seed=1)
        assert len(killed) == 1
        while len(_rows(out / "rounds.csv")) < 3:  # rows 0, 1, 2
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        # what every container said up to round 2, for a failure below (a restart adds to it)
        round_2_logs = "\n".join(f"--- {c.name}\n{testbed.logs(c.name, 40)}"
                                  for c in sorted(testbed.containers(), key=lambda c: c.name))
        testbed.restart(killed)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    print(output)
    assert driver.returncode == 0, output
    rounds = {int(r["round"]): r for r in _rows(out / "rounds.csv")}
    assert sorted(rounds) == list(range(9))
    victim = next(n for n in state.nodes if n.container == killed[0])
    round_2_drops = [(r["node"], r["reason"]) for r in _rows(out / "devices.csv")
                     if int(r["round"]) == 2 and r["status"] == "dropped"]
    if not (int(rounds[2]["dropped"]) == 1 and int(rounds[2]["updates"]) == NODES - 1):
        print(round_2_logs)  # whole, under "Captured stdout": an assertion message is cut short
    assert int(rounds[2]["dropped"]) == 1 and int(rounds[2]["updates"]) == NODES - 1, round_2_drops
    assert rounds[2]["dropped_nodes"] == str(victim.config["partition-id"])  # named by partition
    killed_id = victim.node_id
    nodes = _rows(out / "devices.csv")
    rejoined = [r for r in nodes if int(r["round"]) > 2 and int(r["node"]) == killed_id and r["status"] == "used"]
    assert rejoined, "the restarted node trained no later round"
    # every used update has a measured upload time, beside the modeled one
    used = [r for r in nodes if r["status"] == "used"]
    assert used and all(float(r["upload_s"]) > 0 and float(r["t_com_s"]) > 0 for r in used)
    assert (out / "shaping.csv").exists()
    found = subprocess.run(["grep", "-rlI", *_secret_patterns(testbed), str(out)], capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout  # 1: no match


def test_a_killed_superlink_resumes_with_no_round_lost_or_repeated(testbed, xdg_state):
    state = testbed.state()
    out = Path(state.runs_dir) / "resume"
    driver = _fedfill(xdg_state, "run", "--rounds", "3", "--out", str(out))
    try:
        deadline = time.monotonic() + 600
        while len(_rows(out / "rounds.csv")) < 2:  # rows 0 and 1
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        testbed.kill([testbed.superlink])
        driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    before = [int(r["round"]) for r in _rows(out / "rounds.csv")]
    resumed = _fedfill(xdg_state, "run", "--rounds", "3", "--out", str(out), "--resume")
    output, _ = resumed.communicate(timeout=600)
    print(output)
    assert resumed.returncode == 0, output
    rounds = [int(r["round"]) for r in _rows(out / "rounds.csv")]
    assert rounds == list(range(4)), (before, rounds)


def test_a_killed_driver_is_stopped_and_the_run_resumes(testbed, xdg_state):
    """SIGKILL of `fedfill testbed run` leaves its ServerApp running in the SuperLink; `--resume`
    stops it before reading the checkpoint, so no round is lost or written twice."""
    state = testbed.state()
    out = Path(state.runs_dir) / "driver"
    driver = _fedfill(xdg_state, "run", "--rounds", "3", "--out", str(out))
    try:
        deadline = time.monotonic() + 600
        while len(_rows(out / "rounds.csv")) < 2:  # rows 0 and 1
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        driver.kill()
        driver.communicate(timeout=60)
    # its ServerApp still runs: `down` refuses to end it unasked, and names it
    refused = _fedfill(xdg_state, "down")
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "still going on" in output and "--force" in output, output
    assert testbed.state().nodes  # nothing was removed
    resumed = _fedfill(xdg_state, "run", "--rounds", "3", "--out", str(out), "--resume")
    output, _ = resumed.communicate(timeout=600)
    print(output)
    assert resumed.returncode == 0, output
    assert "left running by an earlier driver" in output
    assert [int(r["round"]) for r in _rows(out / "rounds.csv")] == [0, 1, 2, 3]


def test_a_board_from_its_bundle_joins_reports_its_profile_trains_on_its_data_and_meters_its_energy(
        testbed, xdg_state, tmp_path):
    """A board without a board: a container runs a bundle's own SuperNode command with a copy of
    an Orin NX's sysfs tree and the board's own data mounted; it joins the TLS SuperLink with
    its registered key, reports the board's f_max, trains on its files only, and its rails'
    energy (static: 6.0 W x the step's seconds) lands in devices.csv beside the model's."""
    import numpy as np

    from deploy.bundle import write_bundle
    from deploy.testbed import SUPERLINK_PORT
    from fedfill.config import RunConfig
    from jobs import run_split
    from tests.board_trees import EXPECTED, write_tree

    tree = write_tree("orin-nx", tmp_path / "orin-nx")
    own = run_split(RunConfig()).clients.subset(np.arange(0, 240, 4))  # 60 images of the board's own
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "own.npz", images=own.images, labels=own.labels)
    bundle = write_bundle("orin-1", f"{testbed.superlink}:{SUPERLINK_PORT}", tmp_path / "bundles",
                          pki_root=testbed.dir / "pki", venv="/opt/fedfill",
                          node_config={"sysfs-root": "/board", "data-dir": "/data/own.npz"})
    elsewhere = write_bundle("elsewhere", f"10.9.9.9:{SUPERLINK_PORT}", tmp_path / "bundles",
                             pki_root=testbed.dir / "pki", venv="/opt/fedfill")
    refused = _fedfill(xdg_state, "add-board", str(elsewhere.dir))
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "fedfill board bundle --superlink" in output, output
    add = _fedfill(xdg_state, "add-board", str(bundle.dir), "--mount", f"{tree}:/board",
                   "--mount", f"{tmp_path / 'data'}:/data")
    output, _ = add.communicate(timeout=300)
    assert add.returncode == 0, output
    board = next(n for n in testbed.state().nodes if n.bundle)
    out = Path(testbed.state().runs_dir) / "board"
    driver = _fedfill(xdg_state, "run", "--rounds", "1", "--out", str(out), "--reply-timeout-s", "300")
    output, _ = driver.communicate(timeout=900)
    print(output)
    assert driver.returncode == 0, output + testbed.logs(board.container, 40)

    import json

    profile = json.loads((out / "profiles.json").read_text())[str(board.node_id)]
    assert profile["f_max_hz"] == EXPECTED["orin-nx"]["f_max_hz"] and profile["measured"] == "f_max_hz"
    assert profile["board_power_w"] == EXPECTED["orin-nx"]["power_w"] and profile["d_loc"] == 60
    [row] = [r for r in _rows(out / "devices.csv") if int(r["node"]) == board.node_id]
    assert row["status"] == "used", row
    measured, seconds = float(row["measured_energy_j"]), float(row["measured_s"])
    assert seconds >= float(row["train_s"]) > 0
    assert measured == pytest.approx(EXPECTED["orin-nx"]["power_w"] * seconds, rel=1e-6)
    assert float(row["e_cmp_j"]) > 0, "the model's figure beside it"
    others = [r for r in _rows(out / "devices.csv") if int(r["node"]) != board.node_id]
    assert others and all(r["measured_energy_j"] == "" for r in others), "no sensor, no figure"
    assert (out / "energy.png").stat().st_size > 0


def test_down_leaves_nothing_behind(client, image, tmp_path):
    """A second testbed, removed with the CLI after its command 'crashed' (state kept, no
    process left): every container, network and key goes."""
    from deploy.testbed import LABEL, Testbed
    from commands.run import node_configs

    name = f"{NAME}x"
    bed = Testbed(name, client, state_dir=tmp_path / "state")
    try:
        bed.up(node_configs(1, None, profiles_always=True), image=image, port=free_port(), runs_dir=tmp_path / "runs")
        assert "healthy" in next(r["state"] for r in bed.status() if r["role"] == "generator")
    finally:
        Testbed(name, client, state_dir=tmp_path / "state").down()
    assert client.containers.list(all=True, filters={"label": f"{LABEL}={name}"}) == []
    assert client.networks.list(filters={"label": f"{LABEL}={name}"}) == []
    assert not (tmp_path / "state").exists()
