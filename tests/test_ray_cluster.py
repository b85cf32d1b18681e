"""`fedfill run --ray-address`: Flower's simulation engine on a Ray cluster that is already up.

Real parts: a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a
worker node, each its own raylet with 1 CPU), the fedfill CLI, `flwr run`, the simulation
SuperLink whose Ray joins the cluster through RAY_ADDRESS, and ClientApps in Ray actors.
The cluster keeps its files in a directory of its own (RAY_TMPDIR): Cluster writes its
address where a plain ray.init() on this machine would find and join it otherwise.
About 50 s on 2 cores: the cluster's start (~8 s), the run (~30 s), its stop.
"""

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """A head with 1 CPU and a worker node with 1 CPU; yields (address, node ids)."""
    from ray.cluster_utils import Cluster

    # short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name
    temp = tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": f"{temp}/ray",
                                                                "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert len(nodes) == 2
        yield cluster.address, nodes
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before


def fedfill_run(*flags: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfill", "run", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_run_on_a_two_node_cluster_runs_its_clientapps_on_both_nodes(cluster, tmp_path):
    address, nodes = cluster
    # RAY_ADDRESS, as a user of a cluster has it set, is honoured like --ray-address
    done = fedfill_run("--nodes", "4", "--rounds", "2", "--generator", "none", "--out", str(tmp_path),
                       "--timeout", "300", env={"RAY_ADDRESS": address})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"on the Ray cluster at {address} (Ray " in done.stdout and "2 nodes, 2 CPUs" in done.stdout
    with open(tmp_path / "devices.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(r["status"] == "used" for r in rows)
    ran_on = {r["ray_node"] for r in rows}
    # one 1-CPU actor fits each node: Flower's pool has two, and the round's four ClientApps use both
    assert ran_on == nodes, f"the ClientApps ran on {ran_on}, the cluster's nodes are {nodes}"
    assert not (tmp_path / ".flwr" / "runtime-envs").exists(), "Flower built a runtime environment"


def test_a_cluster_with_no_room_for_a_clientapp_is_refused_before_anything_starts(cluster, tmp_path):
    address, _ = cluster
    started = time.monotonic()
    done = fedfill_run("--ray-address", address, "--client-cpus", "2", "--nodes", "2", "--generator", "none",
                       "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no node of the cluster (1 CPUs, 1 CPUs) has room for a ClientApp of 2 CPUs" in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "flwr.log").exists()


def test_an_unreachable_ray_address_is_refused_at_once_with_the_reason(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    done = fedfill_run("--ray-address", f"127.0.0.1:{port}", "--nodes", "2", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused)" in done.stderr
    assert time.monotonic() - started < 20 and not (tmp_path / "flwr.log").exists()
    done = fedfill_run("--ray-address", "ray://10.0.0.1:10001", "--nodes", "2", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "a Ray Client address" in done.stderr
    done = fedfill_run("--engine", "deployment", "--ray-address", "127.0.0.1:6379", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "leave out --engine deployment" in done.stderr
