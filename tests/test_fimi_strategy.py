"""FimiFedAvg's two jobs, function by function: one ConfigRecord per node from the plan, and
an average of exactly the updates that pass inspection."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from fedfill.codec import encode
from strategies.allocation.presets import fimi_scenario
from strategies.fimi_strategy import UPLOAD_KEY, FimiFedAvg


@pytest.fixture(autouse=True)
def inside_a_flower_run():
    """Messages carry the run's identity; a ServerApp process has it set by Flower."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class OnlineNodes:
    """Stands in for the Grid in configure_train, which only asks which nodes are online."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def strategy_for(n=4, policy="fimi"):
    scenario = fimi_scenario(n, 0)
    profiles = {}
    for k, device in enumerate(scenario.to_json()["devices"]):
        device.pop("class_counts")
        profiles[1000 + k] = device
    return FimiFedAvg(scenario.system, policy, profiles, node_wait_s=0.0), list(profiles)


GLOBAL = [np.zeros((3, 2), np.float32), np.ones(4, np.float32)]


def test_each_node_gets_its_own_plan():
    strategy, nodes = strategy_for()
    messages = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({"local-epochs": 1}), OnlineNodes(nodes)))
    assert sorted(m.metadata.dst_node_id for m in messages) == nodes
    configs = [m.content["config"] for m in messages]
    assert len({id(c) for c in configs}) == len(configs)
    f_values = {c["f-hz"] for c in configs}
    assert len(f_values) == len(configs), "heterogeneous devices must get different frequencies"
    for message in messages:
        planned = strategy._planned[message.metadata.dst_node_id]
        assert message.content["config"]["d-gen"] == round(planned["d_gen"])
        assert message.content["config"]["bits"] == planned["bits"]


def reply_to(node_id, update, weight=10, bits=8, raw=None):
    request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=node_id)
    payload = raw if raw is not None else encode(update, bits, np.random.default_rng(0))
    reply = Message(RecordDict({UPLOAD_KEY: ConfigRecord({"update": payload, "num-examples": weight})}), reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node_id  # Flower sets the sender when the reply travels
    return reply


def test_bad_updates_are_dropped_with_their_reason_and_good_ones_averaged():
    strategy, nodes = strategy_for()
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    good_a = [np.full((3, 2), 1.0, np.float32), np.full(4, 2.0, np.float32)]
    good_b = [np.full((3, 2), 4.0, np.float32), np.full(4, -1.0, np.float32)]
    corrupted = bytearray(encode(good_a, 32, np.random.default_rng(0)))
    corrupted[-3] ^= 0xFF
    replies = [
        reply_to(nodes[0], good_a, weight=30, bits=32),
        reply_to(nodes[1], good_b, weight=10, bits=32),
        reply_to(nodes[2], [np.zeros(6, np.float32), np.zeros(4, np.float32)], bits=32),  # wrong shape
        reply_to(nodes[3], None, raw=bytes(corrupted)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    costs = strategy.round_costs[1]
    assert costs["updates"] == 2 and len(costs["dropped"]) == 2
    reasons = " ".join(d["reason"] for d in costs["dropped"])
    assert "shape" in reasons and "checksum" in reasons
    expected = [g + 0.75 * a + 0.25 * b for g, a, b in zip(GLOBAL, good_a, good_b)]
    for got, want in zip(arrays.to_numpy_ndarrays(), expected):
        assert np.allclose(got, want)
    assert costs["uplink_bytes"] > 0 and costs["energy_j"] > 0


def test_nan_update_is_rejected():
    strategy, nodes = strategy_for(2)
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    verdict = strategy.inspect_reply(reply_to(nodes[0], None, raw=b"not a payload"))
    assert isinstance(verdict, str) and "undecodable" in verdict


def test_devices_that_cannot_meet_the_budget_sit_out_and_the_rest_train():
    strategy, nodes = strategy_for(4)
    strategy.profiles[nodes[2]] = {**strategy.profiles[nodes[2]], "f_max_hz": 1e6}  # far too slow for T_max
    plan, planned = strategy.plan_round(1, nodes)
    assert plan.feasible and nodes[2] not in planned and len(planned) == 3


@pytest.mark.parametrize("policy", ["tfl", "hdc", "fimi+ondemand"])
def test_every_job_policy_plans(policy):
    strategy, nodes = strategy_for(3, policy)
    plan, planned = strategy.plan_round(1, nodes)
    assert plan.feasible and planned == nodes


def test_a_dead_node_costs_one_update_once():
    """The SuperLink answers for a dead node with an error sent in its own name."""
    from flwr.app import Error

    strategy, nodes = strategy_for(3)
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    update = [np.full((3, 2), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=nodes[2])
    unavailable = Message(Error(code=0, reason="Node Unavailable"), reply_to=request)
    unavailable.metadata.__dict__["_src_node_id"] = 1  # the SuperLink
    arrays, _ = strategy.aggregate_train(1, [reply_to(nodes[0], update, bits=32), reply_to(nodes[1], update, bits=32),
                                             unavailable])
    dropped = strategy.round_costs[1]["dropped"]
    assert [d["node"] for d in dropped] == [nodes[2]] and "Node Unavailable" in dropped[0]["reason"]
    assert strategy.round_costs[1]["updates"] == 2 and arrays is not None
