"""Measured upload seconds beside the plan's T_com: the ServerApp's TimedGrid (a short reply
poll that stamps when each reply was pulled), the report's devices.csv and upload.png, and one
real run on the deployment engine."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.report import NODE_COLUMNS, RunReport, read_nodes, read_rounds
from server.timed_grid import TimedGrid
from strategies.fimi_strategy import NODE_FIGURES

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # tests/conftest.py


class FakeGrid(Grid):
    """A SuperLink in a list: each pushed message is answered `delays[node]` seconds after its
    push (a reply created `upload[node]` seconds before it becomes pullable); a node without a
    delay never answers."""

    def __init__(self, delays, upload=None):
        self.delays, self.upload = delays, upload or {}
        self.pending, self.pulls = {}, []

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for k, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{k}"
            self.pending[f"m{k}"] = (message, time.time())
            ids.append(f"m{k}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls.append(time.monotonic())
        out = []
        for message_id in list(message_ids):
            message, pushed = self.pending[message_id]
            node = message.metadata.dst_node_id
            if node in self.delays and time.time() >= pushed + self.delays[node]:
                reply = Message(RecordDict({}), reply_to=message)
                reply.metadata.created_at = pushed + self.delays[node] - self.upload.get(node, 0.0)
                out.append(reply)
                del self.pending[message_id]
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the 3 s loop this wrapper replaces")

    def close(self):
        return "closed"


def messages(*nodes):
    return [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def test_replies_come_as_soon_as_they_are_there_each_with_its_upload_time():
    grid = FakeGrid({1: 0.2, 2: 0.5}, upload={1: 1.5, 2: 0.25})
    timed = TimedGrid(grid, poll_s=0.05)
    started = time.monotonic()
    replies = list(timed.send_and_receive(messages(1, 2), timeout=10))
    took = time.monotonic() - started
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert 0.5 <= took < 2.5, "Flower's Grid sleeps 3 s between pulls; this one polls every 0.05 s"
    by_node = {r.metadata.src_node_id: timed.upload_seconds(r) for r in replies}
    # the reply was created `upload` s before it became pullable, and pulled about a poll later
    # (bounds loose enough for a loaded machine)
    assert 1.5 <= by_node[1] < 1.5 + 1.0 and 0.25 <= by_node[2] < 0.25 + 1.0
    assert timed.pulled_at(replies[0]) <= time.time()


def test_a_node_that_never_answers_costs_the_timeout_not_more():
    grid = FakeGrid({1: 0.0})
    timed = TimedGrid(grid, poll_s=0.1)
    started = time.monotonic()
    replies = list(timed.send_and_receive(messages(1, 2), timeout=0.45))
    took = time.monotonic() - started
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert 0.45 <= took < 1.5
    gaps = [b - a for a, b in zip(grid.pulls, grid.pulls[1:])]
    assert len(gaps) >= 2 and all(gap < 1.0 for gap in gaps), gaps


def test_everything_else_goes_to_the_wrapped_grid():
    grid = FakeGrid({7: 0.0, 9: 0.0})
    timed = TimedGrid(grid)
    timed.set_run("run")
    assert timed.run == "run" and list(timed.get_node_ids()) == [7, 9]
    assert [n.node_id for n in timed.get_nodes()] == [7, 9]
    assert timed.close() == "closed"  # what a concrete grid has beyond the abstract ones
    ids = list(timed.push_messages(messages(7)))
    reply = list(timed.pull_messages(ids))[0]
    assert timed.upload_seconds(reply) is not None, "a reply pulled by hand is timed too"
    unknown = Message(RecordDict({}), reply_to=messages(9)[0])
    assert timed.upload_seconds(unknown) is None
    assert list(timed.send_and_receive([], timeout=1)) == []


def node_row(node_id, partition, status="used", reason="", upload=0.2, measured_j=None):
    """A devices.csv row; measured_j: what the node's board meter gave (None: no sensor)."""
    return {"node": node_id, "partition_id": partition, "bits_planned": 8, "bits": 9 if status == "used" else None,
            "error_demand": 1e-3, "error_expected": 9e-4 if status == "used" else None,
            "error_measured": 9.5e-4 if status == "used" else None, "t_cmp_s": 40.0, "t_com_s": 20.0,
            "energy_j": 0.5 if status == "used" else None, "e_cmp_j": 0.3, "measured_energy_j": measured_j,
            "measured_s": 1.2 if measured_j is not None else None, "plan_uplink_bps": 1e5,
            "train_s": 1.0 if status == "used" else None,
            "upload_s": upload if status == "used" else None, "reply_bytes": 1000 if status == "used" else None,
            "status": status, "reason": reason, "ray_node": "", "gen_planned": ""}


def test_the_report_writes_nodes_names_the_dropped_and_resumes(tmp_path):
    assert NODE_COLUMNS == ("round", *NODE_FIGURES), "the report's columns are the strategy's figures"
    report = RunReport(tmp_path, {"policy": "fimi"})
    report.add_round(0, {"accuracy": 0.1, "loss": 2.0})
    for server_round in (1, 2, 3):
        dropped = "no reply before the timeout" if server_round == 2 else ""
        report.round_costs(server_round, MetricRecord({"energy-j": 1.0, "updates": 2, "dropped": int(bool(dropped))}),
                           [node_row(111, 0, upload=0.3, measured_j=7.5), node_row(222, 1),
                            node_row(2**64 - 3, None, "dropped" if dropped else "used", dropped)])
        report.add_round(server_round, {"accuracy": 0.2 * server_round, "loss": 1.0})
    rows = read_rounds(tmp_path / "rounds.csv")
    assert [r["dropped_nodes"] for r in rows] == ["", "", str(2**64 - 3), ""]  # no partition id: the node id
    assert rows[2]["dropped"] == 1 and isinstance(rows[2]["energy_j"], float)
    nodes = read_nodes(tmp_path / "devices.csv")
    assert len(nodes) == 9 and [n["round"] for n in nodes] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert nodes[0] == {"round": 1, **node_row(111, 0, upload=0.3, measured_j=7.5)}
    assert "measured_energy_j" not in nodes[1], "no sensor: the column is empty, never invented"
    # Flower's node ids are 64-bit: read back exactly, not through a float
    assert nodes[5] == {"round": 2, "node": 2**64 - 3, "bits_planned": 8, "error_demand": 1e-3, "t_cmp_s": 40.0,
                        "t_com_s": 20.0, "e_cmp_j": 0.3, "plan_uplink_bps": 1e5, "status": "dropped",
                        "reason": "no reply before the timeout", "ray_node": "", "gen_planned": ""}
    report.plot()
    assert (tmp_path / "upload.png").stat().st_size > 0 and (tmp_path / "accuracy.png").exists()
    assert (tmp_path / "energy.png").stat().st_size > 0, "measured against modeled energy where a board measured"

    # a run that died after round 3's rows but with its checkpoint at round 1 resumes there
    resumed = RunReport(tmp_path, {"policy": "fimi"})
    resumed.resume_from(1)
    resumed.round_costs(2, MetricRecord({"energy-j": 1.0}), [node_row(111, 0, "dropped", "undecodable update")])
    resumed.add_round(2, {"accuracy": 0.5, "loss": 1.0})
    assert [r["dropped_nodes"] for r in read_rounds(tmp_path / "rounds.csv")] == ["", "", "0"]
    assert [(n["round"], n["node"]) for n in read_nodes(tmp_path / "devices.csv")] == [
        (1, 111), (1, 222), (1, 2**64 - 3), (2, 111)]
    with open(tmp_path / "drops.csv") as fh:
        assert list(csv.DictReader(fh)) == [{"round": "2", "node": "111", "reason": "undecodable update"}]


def test_an_older_rounds_csv_without_the_column_still_reads_and_resumes(tmp_path):
    (tmp_path / "rounds.csv").write_text("round,accuracy,energy_j,uplink_bytes,train_loss\n0,0.1,0.0,0,\n1,0.5,1.5,10,0.9\n")
    rows = read_rounds(tmp_path / "rounds.csv")
    assert rows == [{"round": 0, "accuracy": 0.1, "energy_j": 0.0, "uplink_bytes": 0},
                    {"round": 1, "accuracy": 0.5, "energy_j": 1.5, "uplink_bytes": 10, "train_loss": 0.9}]
    report = RunReport(tmp_path, {})
    report.resume_from(1)
    assert len(report.rows) == 2 and report.node_rows == []


@pytest.mark.slow
def test_a_deployment_run_reports_scenario_profiles_and_measured_uploads_beside_the_plan(tmp_path):
    """One run of real SuperLink and SuperNode processes: each node reports the profile the
    scenario gave it (8-bit uploads here), and the report has a row per planned node and round
    with its measured upload beside the plan; nothing is left running."""
    from tests.test_job_simulation import processes_of_run

    scenario = tmp_path / "s.json"
    made = subprocess.run([sys.executable, "-m", "fedfill", "scenario", "--devices", "3", "--seed", "5",
                           "--out", str(scenario)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    data = json.loads(scenario.read_text())
    for device in data["devices"]:
        device["bits"] = 8  # these devices upload 8-bit updates
    scenario.write_text(json.dumps(data))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--engine", "deployment", "--nodes", "3",
                           "--rounds", "2", "--scenario", str(scenario), "--generator", "none", "--out", str(out),
                           "--timeout", "300"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    reported = json.loads((out / "profiles.json").read_text())
    # each SuperNode reported the profile the scenario gave it (D_loc is its real partition size)
    assert sorted(p["gain"] for p in reported.values()) == pytest.approx(sorted(d["gain"] for d in data["devices"]))
    assert sorted(p["f_max_hz"] for p in reported.values()) == pytest.approx(
        sorted(d["f_max_hz"] for d in data["devices"]))
    nodes = read_nodes(out / "devices.csv")
    params = json.loads((out / "summary.json").read_text())["model_params"]
    partitions = {int(k): p["partition_id"] for k, p in reported.items()}
    assert sorted(partitions.values()) == [0, 1, 2], "each node reported its partition"
    for server_round in (1, 2):
        plan = json.loads((out / f"plan_round_{server_round}.json").read_text())
        assert plan["feasible"] and all(d["bits"] == 8 for d in plan["devices"])
        mine = [n for n in nodes if n["round"] == server_round]
        assert [n["node"] for n in mine] == plan["node_ids"], "a row per planned node, in the plan's order"
        for row, entry in zip(mine, plan["devices"]):
            assert row["t_com_s"] == pytest.approx(entry["t_com_s"], rel=1e-12)
            assert row["t_cmp_s"] == pytest.approx(entry["t_cmp_s"], rel=1e-12)
            assert row["bits"] == row["bits_planned"] == entry["bits"] and "error_demand" not in row  # FIMI: no demand
            assert row["energy_j"] == pytest.approx(entry["e_cmp_j"] + entry["e_com_j"], rel=1e-12)
            assert row["plan_uplink_bps"] == pytest.approx(params * entry["bits"] / entry["t_com_s"])
            assert row["partition_id"] == partitions[row["node"]]
            assert row["status"] == "used" and row["reply_bytes"] > params * entry["bits"] / 8
            assert 0 < row["upload_s"] < 30 and row["train_s"] > 0
    rows = read_rounds(out / "rounds.csv")
    assert [r["dropped_nodes"] for r in rows] == ["", "", ""]
    per_update = rows[1]["round_uplink_bytes"] / rows[1]["updates"]
    assert params <= per_update <= params * 1.05, "an 8-bit update carries about M bytes on the wire"
    assert (out / "upload.png").stat().st_size > 0
    assert (out / "logs" / "supernode-2.log").exists()
    assert not (out / ".flwr" / "runtime-envs").exists()
    assert processes_of_run(out) == [], "processes of the run were left running"


def test_an_error_made_in_the_superlinks_name_is_traced_to_the_node_it_is_about():
    from flwr.app import Error

    grid = FakeGrid({3: 0.0, 5: 0.0})
    timed = TimedGrid(grid)
    sent = messages(3, 5)
    ids = list(timed.push_messages(iter(sent)))  # any iterable, as Flower's Grid takes
    error = Message(Error(code=0, reason="Reply message objects are unavailable"), reply_to=sent[1])
    error.metadata.__dict__["_src_node_id"] = 0  # the ServerApp's own node made it, not node 5
    assert ids == ["m0", "m1"] and timed.addressee(error) == 5
    assert timed.addressee(Message(RecordDict({}), reply_to=messages(9)[0])) is None, "never sent: unknown"
