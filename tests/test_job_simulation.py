"""The FIMI job end to end on Flower's simulation engine: `fedfill run` as a user runs it.

Real processes: the fedfill CLI, `flwr run`, a simulation SuperLink and ClientApps on Ray.
About 35 s on 2 cores, most of it Ray's start.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def processes_of_run(out: Path) -> list[str]:
    """Live processes of the run writing to `out`: every Flower process of a run has
    FLWR_HOME=OUT/.flwr in its environment (Ray's workers inherit it), and the generation
    service names OUT in its command line. Zombies have neither, so they do not count."""
    marker, home = str(out).encode(), f"FLWR_HOME={out / '.flwr'}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if int(proc.name) != os.getpid() and (marker in cmdline or home in environ):
            found.append(f"{proc.name}: {cmdline.replace(bytes(1), b' ').decode(errors='replace')[:160]}")
    return found


@pytest.mark.slow
def test_fedfill_run_trains_plans_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--rounds", "2",
                           "--out", str(tmp_path), "--timeout", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert float(rows[2]["accuracy"]) > float(rows[0]["accuracy"]), "two rounds of FedAvg should beat the random start"
    energy = [float(r["energy_j"]) for r in rows]
    uplink = [int(r["uplink_bytes"]) for r in rows]
    assert energy[0] == 0 and energy[1] > 0 and energy[2] > energy[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    params = summary["model_params"]
    # three 32-bit updates a round: at least M x 32 bits each, plus headers and message framing
    assert 3 * params * 4 <= uplink[1] <= 3 * params * 4 * 1.05
    for round_number in (1, 2):
        plan = json.loads((tmp_path / f"plan_round_{round_number}.json").read_text())
        assert plan["feasible"] and len(plan["devices"]) == 3 == len(plan["node_ids"])
        assert float(rows[round_number]["round_energy_j"]) == pytest.approx(plan["energy_j"], rel=1e-9)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    # Issue 7: Flower installed the app's dependencies into a fresh env per run (CUDA torch,
    # ~5 GB, under FLWR_HOME/runtime-envs) and ran the apps on it. Nothing may be installed,
    # and the ServerApp runs on this interpreter and its CPU torch.
    assert not (tmp_path / ".flwr" / "runtime-envs").exists(), "Flower built a runtime environment"
    environment = summary["environment"]
    assert Path(environment["python"]).resolve() == Path(sys.executable).resolve()
    assert "+cu" not in environment["torch"]
    assert (tmp_path / "app" / "pyproject.toml").exists() and not list((tmp_path / "app").glob("**/*.py"))
    assert "num-supernodes" not in (tmp_path / ".flwr" / "config.toml").read_text()
    assert "Federation `@none/default` (3 simulated SuperNodes)" in (tmp_path / "flwr.log").read_text()
    assert processes_of_run(tmp_path) == [], "processes of the run were left running"


def test_processes_of_run_finds_a_process_by_its_flower_home(tmp_path):
    """The check the runs below rely on does see a live process of a run."""
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, "FLWR_HOME": str(tmp_path / ".flwr")})
    try:
        # Until the child has exec'd, /proc shows the parent's environment: wait for the exec.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"sleep\0") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [line.split(":")[0] for line in processes_of_run(tmp_path)] == [str(child.pid)]
    finally:
        child.kill()
        child.wait()
    assert processes_of_run(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_simulation_run_leaves_no_process(tmp_path, sig):
    """Ctrl-C or SIGTERM mid-run, with Ray and the apps up: `fedfill run` ends the SuperLink's
    and the SuperExec's process groups, and with them every process of the run."""
    run = subprocess.Popen([sys.executable, "-m", "fedfill", "run", "--nodes", "2", "--rounds", "50",
                            "--generator", "none", "--out", str(tmp_path), "--timeout", "400"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rounds_csv, deadline = tmp_path / "rounds.csv", time.monotonic() + 300
        while not (rounds_csv.exists() and len(rounds_csv.read_text().splitlines()) >= 3):  # header, rounds 0, 1
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never came"
            time.sleep(0.5)
        running = processes_of_run(tmp_path)
        assert any("ray::ClientAppActor" in line for line in running), running
        run.send_signal(sig)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130 and "interrupted" in output and "Traceback" not in output, output
    assert processes_of_run(tmp_path) == [], "processes of the run were left running"


def test_a_scenario_that_does_not_match_the_nodes_is_refused(tmp_path):
    scenario = tmp_path / "s.json"
    subprocess.run([sys.executable, "-m", "fedfill", "scenario", "--devices", "3", "--out", str(scenario)],
                   cwd=ROOT, check=True, timeout=60)
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "2",
                           "--scenario", str(scenario), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "has 3 devices but --nodes is 2" in done.stderr


@pytest.mark.slow
def test_a_supernode_killed_mid_run_costs_its_update_not_the_round(tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "3",
                            "--rounds", "3", "--generator", "none", "--out", str(out), "--timeout", "400"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rounds_csv, deadline = out / "rounds.csv", time.monotonic() + 300
        while not (rounds_csv.exists() and len(rounds_csv.read_text().splitlines()) >= 3):  # header, round 0, round 1
            assert run.poll() is None and time.monotonic() < deadline, "round 1 never came"
            time.sleep(1)
        address = (out / ".flwr" / "config.toml").read_text().split('address = "')[1].split('"')[0]
        victims = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                   if (lambda c: b"supernode" in c and address.encode() in c and b"partition-id=2" in c)(
                       p.read_bytes() if p.exists() else b"")]
        assert victims, "supernode 2 not found"
        os.killpg(os.getpgid(victims[0]), signal.SIGKILL)
        output, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output
    assert "supernode-2 exited" in output
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3], "no round may be lost"
    for row in rows[1:]:  # every planned device is either averaged or dropped with a reason
        planned = json.loads((out / f"plan_round_{row['round']}.json").read_text())["node_ids"]
        assert int(row["updates"]) + int(row["dropped"]) == len(planned)
    assert int(rows[1]["updates"]) == 3 and int(rows[3]["updates"]) == 2, "the dead node is no longer planned"
    assert processes_of_run(out) == [], "processes of the run were left running"  # the warm node's included


def test_a_wrong_dataset_path_is_refused_before_anything_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--dataset", "cifar10", "--data-dir",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(tmp_path / "nowhere") in done.stderr


@pytest.mark.slow
def test_clients_train_on_local_data_when_the_generation_service_is_down(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "2", "--rounds", "1",
                           "--generator", f"127.0.0.1:{dead}", "--out", str(tmp_path), "--timeout", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert int(rows[1]["updates"]) == 2 and int(rows[1]["synthetic_used"]) == 0
    plan = json.loads((tmp_path / "plan_round_1.json").read_text())
    assert sum(d["d_gen"] for d in plan["devices"]) > 0, "the plan asked for synthetic data"
    assert "generation service unavailable" in (tmp_path / "flwr.log").read_text()


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_checkpoint_exactly(tmp_path):
    """Seeds follow the round number, so 2 rounds + a resume to 3 must equal 3 rounds straight."""

    def start(out, rounds, *extra):
        return subprocess.Popen([sys.executable, "-m", "fedfill", "run", "--nodes", "2", "--rounds", str(rounds),
                                 "--out", str(out), "--timeout", "300", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def finish(run, out):
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
        with open(out / "rounds.csv") as fh:
            return list(csv.DictReader(fh))

    # the straight run goes alongside the stopped-and-resumed one (they share nothing but the machine)
    straight_run = start(tmp_path / "straight", 3)
    try:
        finish(start(tmp_path / "resumed", 2), tmp_path / "resumed")
        resumed = finish(start(tmp_path / "resumed", 3, "--resume"), tmp_path / "resumed")
        straight = finish(straight_run, tmp_path / "straight")
    finally:
        if straight_run.poll() is None:
            straight_run.kill()
    assert [r["round"] for r in resumed] == ["0", "1", "2", "3"]
    assert "resuming after round 2 of 3" in (tmp_path / "resumed" / "flwr.log").read_text()
    for column in ("accuracy", "energy_j"):
        assert float(resumed[3][column]) == pytest.approx(float(straight[3][column]), rel=1e-6)
    # The resumed nodes' synthetic cache died with the old run: they regenerate the same samples
    # and their reply note says "generated N" instead of "cached", a few bytes more on the wire.
    assert abs(int(resumed[3]["uplink_bytes"]) - int(straight[3]["uplink_bytes"])) <= 64
    # stopped before round 1 finished: only round 0's checkpoint to resume from, and its row is not written twice
    early = start(tmp_path / "early", 2)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "early" / "checkpoint.npz").exists():
            assert early.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        early.send_signal(signal.SIGINT)
        early.communicate(timeout=120)
    finally:
        if early.poll() is None:
            early.kill()
    with open(tmp_path / "early" / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["0"], "the run was meant to stop inside round 1"
    again = finish(start(tmp_path / "early", 2, "--resume"), tmp_path / "early")
    assert [r["round"] for r in again] == ["0", "1", "2"]
    assert "resuming after round 0 of 2" in (tmp_path / "early" / "flwr.log").read_text()
    nothing = subprocess.run([sys.executable, "-m", "fedfill", "run", "--resume", "--out", str(tmp_path / "none")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr
