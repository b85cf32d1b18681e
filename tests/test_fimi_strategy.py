"""FimiFedAvg's two jobs, function by function: one ConfigRecord per node from the plan, and
Flower's FedAvg over exactly the updates that pass inspection. Replies are built with the
same contract builders the ClientApp uses."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict


from fedfill import contract
from fedfill.codec import encode
from strategies.allocation.presets import fimi_scenario
from strategies.fimi_strategy import FimiFedAvg


pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # tests/conftest.py


class OnlineNodes:
    """Stands in for the Grid in configure_train, which only asks which nodes are online."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


class Rounds:
    """Collects what the strategy hands the report at the end of each round."""

    def __init__(self):
        self.costs, self.drops, self.nodes = {}, {}, {}

    def __call__(self, server_round, record, nodes):
        self.costs[server_round], self.nodes[server_round] = dict(record), nodes
        self.drops[server_round] = [{"node": n["node"], "reason": n["reason"]} for n in nodes
                                    if n["status"] == "dropped"]


def strategy_for(n=4, policy="fimi"):
    scenario = fimi_scenario(n, 0)
    profiles = {}
    for k, device in enumerate(scenario.to_json()["devices"]):
        device.pop("class_counts")
        profiles[1000 + k] = device
    rounds = Rounds()
    strategy = FimiFedAvg(scenario.system, policy, profiles, node_wait_s=0.0, on_round_metrics=rounds)
    strategy.rounds = rounds
    return strategy, list(profiles)


GLOBAL = [np.zeros((3, 2), np.float32), np.ones(4, np.float32)]


def test_each_node_gets_its_own_plan():
    strategy, nodes = strategy_for()
    messages = list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({"local-epochs": 1}), OnlineNodes(nodes)))
    assert sorted(m.metadata.dst_node_id for m in messages) == nodes
    configs = [m.content["config"] for m in messages]
    assert len({id(c) for c in configs}) == len(configs)
    f_values = {c["f-hz"] for c in configs}
    assert len(f_values) == len(configs), "heterogeneous devices must get different frequencies"
    plan = strategy.plan_round(1, nodes)[0].to_json()["devices"]
    for message, entry in zip(sorted(messages, key=lambda m: m.metadata.dst_node_id), plan):
        received = contract.NodePlan.from_config(message.content[contract.CONFIG_KEY])
        assert received == strategy._planned[message.metadata.dst_node_id]
        assert received.d_gen == round(entry["d_gen"]) and received.bits == entry["bits"]
        assert received.f_hz == entry["f_hz"] and received.server_round == 1 and received.policy == "fimi"


def reply_to(node_id, update, weight=10, bits=8, raw=None, content=None, codec_constant=0.0, measured_j=None):
    request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=node_id)
    payload = raw if raw is not None else encode(update, bits, np.random.default_rng(0))
    metrics = contract.TrainMetrics(num_examples=weight, d_gen_used=2, train_seconds=0.5, train_loss=1.0,
                                    upload_bytes=len(payload), modeled_energy_j=0.1, bits=bits,
                                    codec_constant=codec_constant, measured_energy_j=measured_j,
                                    measured_s=None if measured_j is None else 0.6)
    reply = Message(content or contract.train_reply(payload, metrics, "test"), reply_to=request)
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
    assert dict(metrics) == strategy.rounds.costs[1], "the report gets the record Flower keeps"
    assert metrics["updates"] == 2 and metrics["dropped"] == 2
    reasons = " ".join(d["reason"] for d in strategy.rounds.drops[1])
    assert "shape" in reasons and "checksum" in reasons
    expected = [g + 0.75 * a + 0.25 * b for g, a, b in zip(GLOBAL, good_a, good_b)]
    for got, want in zip(arrays.to_numpy_ndarrays(), expected):
        assert got.dtype == np.float32 and np.allclose(got, want)
    assert metrics["uplink-bytes"] > 0 and metrics["energy-j"] > 0
    assert metrics["synthetic-used"] == 4 and metrics["train-s-sum"] == 1.0 and metrics["train-loss"] == 1.0
    # one row per planned node: the plan's figures beside the measured ones
    from strategies.fimi_strategy import NODE_FIGURES

    nodes_seen = strategy.rounds.nodes[1]
    assert [n["node"] for n in nodes_seen] == nodes and all(tuple(n) == NODE_FIGURES for n in nodes_seen)
    assert [n["status"] for n in nodes_seen] == ["used", "used", "dropped", "dropped"]
    for n in nodes_seen:
        plan = strategy._planned[n["node"]]
        assert n["t_com_s"] == plan.t_com_s and n["bits_planned"] == plan.bits
        used = n["status"] == "used"
        assert n["bits"] == (plan.bits if used else None)
        if used:  # E_cmp for the samples its reply says it trained (30 and 10 here), of those planned
            share = min(1.0, {nodes[0]: 30, nodes[1]: 10}[n["node"]] / (strategy.profiles[n["node"]]["d_loc"] + plan.d_gen))
            assert n["energy_j"] == pytest.approx(plan.e_cmp_j * share + plan.e_com_j)
        else:
            assert n["energy_j"] is None
        assert n["plan_uplink_bps"] == pytest.approx(strategy.system.model_params * plan.bits / plan.t_com_s)
        assert n["reply_bytes"] > 0 and n["upload_s"] is None  # no timing grid given
    assert [n["train_s"] for n in nodes_seen] == [0.5, 0.5, None, None]
    assert sum(n["reply_bytes"] for n in nodes_seen) == metrics["uplink-bytes"]


def with_nan(payload: bytes) -> bytes:
    """A well-formed raw float32 payload whose first value is NaN (encode refuses to make one)."""
    import zlib

    body = bytearray(payload[16:])
    body[36:40] = b"\xff\xff\xff\xff"  # after the first 36-byte tensor header: the first float's bits
    header = bytearray(payload[:16])
    header[12:16] = zlib.crc32(bytes(body)).to_bytes(4, "little")
    return bytes(header + body)


@pytest.mark.parametrize("reply,reason", [
    (dict(raw=b"not a payload"), "undecodable"),
    (dict(raw=with_nan(encode(GLOBAL, 32, np.random.default_rng(0)))), "NaN"),
    (dict(raw=b"x", weight=0), "num-examples"),
    (dict(raw=b"x", content=RecordDict({"metrics": contract.TrainMetrics(1, 0, 0.0, 0.0, 0, 0.0).to_record()})),
     "no quantized update"),
])
def test_unusable_replies_are_refused_with_the_reason(reply, reason):
    strategy, nodes = strategy_for(2)
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    with pytest.raises(contract.ReplyError, match=reason):
        strategy.decode_reply(reply_to(nodes[0], reply.pop("update", None), **reply))


def test_devices_that_cannot_meet_the_budget_sit_out_and_the_rest_train():
    strategy, nodes = strategy_for(4)
    strategy.profiles[nodes[2]] = {**strategy.profiles[nodes[2]], "f_max_hz": 1e6}  # far too slow for T_max
    plan, planned = strategy.plan_round(1, nodes)
    assert plan.feasible and nodes[2] not in planned and len(planned) == 3


@pytest.mark.parametrize("policy", ["tfl", "hdc", "fixed", "ondemand", "fimi+ondemand"])
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
    dropped = strategy.rounds.drops[1]
    assert [d["node"] for d in dropped] == [nodes[2]] and "Node Unavailable" in dropped[0]["reason"]
    assert strategy.rounds.nodes[1][2]["reply_bytes"] is None and strategy.rounds.nodes[1][2]["upload_s"] is None
    assert strategy.rounds.costs[1]["updates"] == 2 and strategy.rounds.costs[1]["dropped"] == 1
    assert arrays is not None


def test_an_error_about_one_node_is_charged_to_it_alone():
    """A node killed while uploading: the ServerApp's pull makes an error in its own name for
    that node's reply. Another node that sent nothing is dropped for its own reason, the
    timeout, not for the first one's error."""
    from flwr.app import Error

    strategy, nodes = strategy_for(3)
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    update = [np.full((3, 2), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    request = Message(RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=nodes[1])
    request.metadata.__dict__["_message_id"] = "to-node-1"
    unavailable = Message(Error(code=3, reason="Reply message objects are unavailable"), reply_to=request)
    unavailable.metadata.__dict__["_src_node_id"] = 1  # not the node: the ServerApp's pull
    strategy.addressee = lambda reply: {"to-node-1": nodes[1]}.get(reply.metadata.reply_to_message_id)
    strategy.aggregate_train(1, [reply_to(nodes[0], update, bits=32), unavailable])
    reasons = {d["node"]: d["reason"] for d in strategy.rounds.drops[1]}
    assert reasons == {nodes[1]: "no reply (Reply message objects are unavailable)",
                       nodes[2]: "no reply before the timeout"}
    assert strategy.rounds.costs[1]["updates"] == 1 and strategy.rounds.costs[1]["dropped"] == 2


def test_the_strategy_times_each_reply_and_forgets_a_plan_it_did_not_send():
    strategy, nodes = strategy_for(2)
    strategy.upload_seconds = lambda reply: 0.1 * reply.metadata.src_node_id
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    update = [np.full((3, 2), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    strategy.aggregate_train(1, [reply_to(n, update, bits=32) for n in nodes])
    assert [n["upload_s"] for n in strategy.rounds.nodes[1]] == pytest.approx([0.1 * n for n in nodes])
    # a round where nobody is online plans nobody, and accounts for nobody
    strategy.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes([]))
    strategy.aggregate_train(2, [])
    assert strategy.rounds.nodes[2] == [] and strategy.rounds.costs[2]["dropped"] == 0


def test_a_boards_measured_energy_stands_beside_the_modeled_and_none_is_invented():
    strategy, nodes = strategy_for(3)
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    update = [np.full((3, 2), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    strategy.aggregate_train(1, [reply_to(nodes[0], update, bits=32, measured_j=3.5),
                                 reply_to(nodes[1], update, bits=32),
                                 reply_to(nodes[2], update, bits=32, measured_j=float("nan"))])
    rows = {row["node"]: row for row in strategy.rounds.nodes[1]}
    assert (rows[nodes[0]]["measured_energy_j"], rows[nodes[0]]["measured_s"]) == (3.5, 0.6)
    assert rows[nodes[0]]["e_cmp_j"] == strategy._planned[nodes[0]].e_cmp_j > 0, "the modeled local step beside it"
    assert rows[nodes[1]]["measured_energy_j"] is None, "no sensor: nothing measured"
    assert rows[nodes[2]]["measured_energy_j"] is None, "a meter's nonsense is not a figure"


def ondemand_strategy(n=3, policy="ondemand"):
    from strategies.allocation.presets import ondemand_scenario

    scenario = ondemand_scenario(n, 0)
    profiles = {2000 + k: device for k, device in enumerate(scenario.to_json()["devices"])}
    rounds = Rounds()
    strategy = FimiFedAvg(scenario.system, policy, profiles, node_wait_s=0.0, on_round_metrics=rounds)
    strategy.rounds = rounds
    return strategy, list(profiles)


def planned_samples(strategy, node: int) -> int:
    """What a device trains when its whole fill arrives: its own data and the plan's d_gen."""
    return int(strategy.profiles[node]["d_loc"]) + strategy._planned[node].d_gen


def test_a_device_whose_fill_did_not_come_is_charged_for_the_samples_it_trained_not_the_plans():
    strategy, nodes = strategy_for()
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    planned = dict(strategy._planned)
    filled, unfilled = [n for n in nodes if planned[n].d_gen > 0][:2]
    update = [np.full((3, 2), 0.5, np.float32), np.ones(4, np.float32)]
    own_data = int(strategy.profiles[unfilled]["d_loc"])
    replies = [reply_to(filled, update, bits=planned[filled].bits, weight=planned_samples(strategy, filled)),
               reply_to(unfilled, update, bits=planned[unfilled].bits, weight=own_data)]  # the service was down
    strategy.aggregate_train(1, replies)
    rows = {row["node"]: row for row in strategy.rounds.nodes[1]}
    assert rows[filled]["energy_j"] == pytest.approx(planned[filled].modeled_energy_j)
    unfilled_plan = planned[unfilled]
    assert rows[unfilled]["energy_j"] < unfilled_plan.modeled_energy_j
    assert rows[unfilled]["energy_j"] == pytest.approx(
        unfilled_plan.e_cmp_j * own_data / planned_samples(strategy, unfilled) + unfilled_plan.e_com_j)


def test_a_device_that_raised_its_bits_is_charged_for_them_and_its_codec_constant_plans_its_next_bits():
    strategy, nodes = ondemand_strategy()
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    planned = dict(strategy._planned)
    assert all(p.error_demand == strategy.profiles[n]["quant_error"] > 0 for n, p in planned.items())
    update = [np.full((3, 2), 0.5, np.float32), np.linspace(-1, 1, 4).astype(np.float32)]
    raised = planned[nodes[0]].bits + 2
    trained = {n: planned_samples(strategy, n) for n in nodes}
    replies = [reply_to(nodes[0], update, bits=raised, codec_constant=50.0, weight=trained[nodes[0]])]
    replies += [reply_to(n, update, bits=planned[n].bits, codec_constant=0.0, weight=trained[n]) for n in nodes[1:]]
    _, metrics = strategy.aggregate_train(1, replies)
    rows = {row["node"]: row for row in strategy.rounds.nodes[1]}
    assert rows[nodes[0]]["bits"] == raised and rows[nodes[0]]["bits_planned"] == planned[nodes[0]].bits
    assert rows[nodes[0]]["energy_j"] > planned[nodes[0]].modeled_energy_j, "more bits in the same T_com cost more"
    assert rows[nodes[1]]["energy_j"] == planned[nodes[1]].modeled_energy_j
    assert metrics["energy-j"] == pytest.approx(sum(row["energy_j"] for row in rows.values()))
    # the reported constant replaces the prior for that node only (0: none measured, keep the prior)
    assert strategy.profiles[nodes[0]]["codec_constant"] == 50.0
    assert "codec_constant" not in strategy.profiles[nodes[1]]
    strategy.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    assert strategy._planned[nodes[0]].bits > planned[nodes[0]].bits, "a larger constant asks for more bits"
    assert strategy._planned[nodes[1]].bits == planned[nodes[1]].bits


def test_fixed_width_policies_send_their_bits_whatever_the_demand():
    strategy, nodes = ondemand_strategy(policy="fixed-6")
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    assert {p.bits for p in strategy._planned.values()} == {6}
    assert all(p.error_demand == 0.0 for p in strategy._planned.values())


def test_the_merge_does_not_depend_on_the_order_replies_arrive_in():
    """Float sums depend on their order: merged in arrival order, two runs of one seed drift
    apart within a few rounds (seen: identical TFL runs 38 and 46 rounds to 95%)."""
    # magnitudes at which the sum's order shows: 1e17 + 1 - 1e17 is 0, 1e17 - 1e17 + 1 is 1
    updates = [[np.full((3, 2), value, np.float32), np.full(4, value, np.float32)] for value in (1e17, 1.0, -1e17, 0.0)]
    merged = []
    for order in ([0, 1, 2, 3], [0, 2, 1, 3]):
        strategy, nodes = strategy_for()
        strategy.screen.bound = 0.0  # these norms are the point here, not an attack
        strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
        replies = [reply_to(nodes[k], updates[k], weight=10, bits=32) for k in order]
        merged.append(strategy.aggregate_train(1, replies)[0].to_numpy_ndarrays())
    assert all(np.array_equal(a, b) for a, b in zip(*merged))


def test_the_same_seed_samples_the_same_devices_whatever_ids_flower_gives_their_nodes():
    """Flower draws new node ids every run: the sample and the plan follow the partitions."""
    scenario = fimi_scenario(30, 0)
    devices = []
    for k, device in enumerate(scenario.to_json()["devices"]):
        device.pop("class_counts")
        devices.append({**device, contract.PARTITION_FIELD: k})

    def sampled_partitions(node_ids):
        profiles = dict(zip(node_ids, devices))
        strategy = FimiFedAvg(scenario.system, "fimi", profiles, seed=3, node_wait_s=0.0, fraction_train=0.2,
                              min_train_nodes=2)
        messages = strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({"local-epochs": 1}),
                                            OnlineNodes([int(n) for n in np.random.default_rng(len(node_ids)).permutation(node_ids)]))
        return {profiles[m.metadata.dst_node_id][contract.PARTITION_FIELD]: contract.NodePlan.from_config(
            m.content[contract.CONFIG_KEY]).d_gen for m in messages}

    ids = np.random.default_rng(0).integers(1, 2**62, size=(2, 30))
    first, second = sampled_partitions([int(i) for i in ids[0]]), sampled_partitions([int(i) for i in ids[1]])
    assert len(first) == 6 and first == second


def test_the_delivery_planner_sees_each_device_as_its_trace_has_it_this_round():
    """--traces with --delivery auto: a device whose trace halves its CPU is planned slower."""
    from strategies.allocation.traces import parse_traces

    scenario = fimi_scenario(3, 0)
    profiles = {}
    for k, device in enumerate(scenario.to_json()["devices"]):
        device.pop("class_counts")
        profiles[500 + k] = {**device, contract.PARTITION_FIELD: k}
    traces = parse_traces({"format": "fedfill-traces", "version": 1, "devices": {
        str(k): {"on": [[0, 1e6]], "capacity": [[0, 0.5 if k == 1 else 1.0, 1.0]]} for k in range(3)}})
    seen = {}

    def planner(planned_profiles, images):
        seen.update(planned_profiles)
        return {}

    strategy = FimiFedAvg(scenario.system, "fimi", profiles, node_wait_s=0.0, traces=traces, delivery_planner=planner)
    list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({"local-epochs": 1}), OnlineNodes(list(profiles))))
    assert 501 in seen, "the planner saw the traced device"
    for node, profile in seen.items():
        factor = 0.5 if node == 501 else 1.0
        assert profile["f_max_hz"] == pytest.approx(profiles[node]["f_max_hz"] * factor)


def test_without_a_generation_service_fimi_plans_what_tfl_plans():
    from fedfill.config import RunConfig
    from server.app import run_system

    template, nodes = strategy_for()
    profiles = template.profiles
    plans = {}
    for address, policy in (("127.0.0.1:50051", "fimi"), ("", "fimi"), ("", "tfl")):
        system = run_system(RunConfig(generator_address=address), 10_000, profiles)
        strategy = FimiFedAvg(system, policy, profiles, node_wait_s=0.0)
        plans[address, policy] = strategy.plan_round(1, nodes)[0].to_json()["devices"]
    assert sum(d["d_gen"] for d in plans["127.0.0.1:50051", "fimi"]) > 0
    without, tfl = plans["", "fimi"], plans["", "tfl"]
    assert without and all(d["d_gen"] == 0 for d in without)
    for key in ("f_hz", "b_hz", "p_w", "e_cmp_j", "e_com_j"):  # the error target binds nothing it could change
        assert [d[key] for d in without] == pytest.approx([d[key] for d in tfl], rel=1e-6), key


def test_a_run_stops_at_the_first_round_whose_merged_model_is_not_finite_and_says_what_to_change():
    from server.app import DivergedModel, check_finite

    from jobs.classifier import ClassifierJob

    finite, watched = [np.ones((2, 2), np.float32)], ClassifierJob.finite_metrics
    check_finite(3, finite, {"accuracy": 0.9, "loss": 0.3}, lr=0.05, watched=watched)
    with pytest.raises(DivergedModel, match=r"round 3: .*Lower --lr \(now 0.05\).*round 2's model"):
        check_finite(3, finite, {"accuracy": 0.1, "loss": float("nan")}, lr=0.05, watched=watched)  # outputs overflowed
    with pytest.raises(DivergedModel, match="--norm-bound"):
        check_finite(1, [np.array([1.0, np.inf], np.float32)], {"accuracy": 0.1, "loss": 2.3}, lr=0.02)
    # a figure NaN by design (the ddpm job's unseen-class scores when the start saw every class)
    check_finite(2, finite, {"fidelity": 0.9, "fidelity_unseen": float("nan")}, lr=5e-4, watched=())
