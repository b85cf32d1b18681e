"""A node on a board (`sysfs-root` node config): its QUERY reply carries the board's measured
f_max and figures beside what stays configured or drawn, and its TRAIN reply the energy its
rails measured over the local step, which the server's report puts beside the model's."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedfill import contract
from fedfill.config import RunConfig
from jobs import load_job
from strategies.allocation.presets import drawn_device_profile
from tests.board_trees import EXPECTED, write_tree

RUN = RunConfig(local_epochs=1)


def context_for(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=RUN.to_run_config())


def query_profile(node_config: dict) -> dict:
    from client.app import query

    request = Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=7)
    return contract.read_profile(query(request, context_for(node_config)).content)


def test_a_board_reports_its_measured_f_max_and_keeps_the_rest_drawn_or_configured(tmp_path, inside_a_flower_run):
    root = write_tree("orin-nx", tmp_path)
    expected = EXPECTED["orin-nx"]
    node = {"partition-id": 1, "num-partitions": 4, "sysfs-root": str(root)}
    profile = query_profile(node)
    drawn = drawn_device_profile("fimi", 1, 4, RUN.seed)
    assert profile["f_max_hz"] == expected["f_max_hz"] and profile["measured"] == "f_max_hz"
    assert {k: profile[k] for k in ("eps", "p_max_w", "gain")} == {k: drawn[k] for k in ("eps", "p_max_w", "gain")}, \
        "eps, transmit power and gain cannot be read from a board: drawn as before"
    assert (profile["board_cores"], profile["board_power_w"], profile["board_gpu"], profile["board_energy_counter"]) \
        == (expected["cores"], expected["power_w"], expected["gpu"], "ina3221")

    configured = query_profile({**node, "eps": 2e-28, "p-max-w": 0.2, "gain": 1e-7})
    assert (configured["eps"], configured["p_max_w"], configured["gain"]) == (2e-28, 0.2, 1e-7)
    assert configured["f_max_hz"] == expected["f_max_hz"], "the operator's figures with the board's f_max"
    capped = query_profile({**node, "f-max-hz": 1.2e9})  # a board run in a capped power mode
    assert capped["f_max_hz"] == 1.2e9 and "measured" not in capped, "the operator's word wins"


def test_a_board_without_cpufreq_or_sensors_says_nothing_it_did_not_measure(tmp_path, inside_a_flower_run):
    root = write_tree("bare", tmp_path)
    profile = query_profile({"partition-id": 0, "num-partitions": 4, "sysfs-root": str(root)})
    assert profile["f_max_hz"] == drawn_device_profile("fimi", 0, 4, RUN.seed)["f_max_hz"]
    assert "measured" not in profile and "board_power_w" not in profile and "board_energy_counter" not in profile
    assert profile["board_cores"] == EXPECTED["bare"]["cores"]


def train_reply_metrics(node_config: dict) -> dict:
    from client.app import train

    job = load_job(RUN)
    plan = contract.NodePlan(server_round=1, policy="fimi", d_gen=0, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5,
                             bits=8, t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1)
    content = contract.train_message_content(ArrayRecord(job.initial_weights()), plan, ConfigRecord({}))
    reply = train(Message(content, message_type=MessageType.TRAIN, dst_node_id=7), context_for(node_config))
    return contract.read_train_reply(reply.content)[1]


@pytest.mark.parametrize("kind", ["orin-nx", "nano-jp4"])
def test_a_boards_rails_meter_the_local_step(tmp_path, inside_a_flower_run, kind):
    root = write_tree(kind, tmp_path)
    metrics = train_reply_metrics({"partition-id": 0, "num-partitions": 4, "sysfs-root": str(root)})
    # the tree's rails are static: the board drew power_w for the whole step
    assert metrics["measured-s"] >= metrics["train-seconds"] > 0
    assert metrics["measured-energy-j"] == pytest.approx(EXPECTED[kind]["power_w"] * metrics["measured-s"], rel=1e-6)


def test_no_sensor_no_figure_and_no_board_no_meter(tmp_path, inside_a_flower_run):
    bare = train_reply_metrics({"partition-id": 0, "num-partitions": 4, "sysfs-root": str(write_tree("bare", tmp_path))})
    simulated = train_reply_metrics({"partition-id": 0, "num-partitions": 4})
    for metrics in (bare, simulated):
        assert not set(contract.METER_METRICS) & set(metrics), "never an invented figure"
        assert np.isfinite(metrics["train-seconds"])
