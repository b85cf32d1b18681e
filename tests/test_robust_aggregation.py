"""Issue 13, items 2 and 3: the strategy screens updates (one per node per round, a norm bound
relative to the round's median) and merges what is left with the rule the run names, by
Flower's own maths (FedAvg weighted by D_loc + D_gen, FedMedian, FedTrimmedAvg). Replies are
the ClientApp's, built by tests/test_fimi_strategy.py's helpers; 32-bit payloads, so the
decoded updates are the sent ones exactly."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedfill.config import RunConfig
from server.report import DROPPED_BY_CLASS, RunReport, read_rounds
from strategies.fimi_strategy import DROP_CLASSES, FimiFedAvg
from tests.test_fimi_strategy import GLOBAL, OnlineNodes, Rounds, reply_to, strategy_for

pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # tests/conftest.py


def planned_strategy(n: int, **settings) -> tuple[FimiFedAvg, list[int]]:
    """A strategy over strategy_for's fleet with these screening and aggregation settings,
    its first round planned for all n nodes."""
    fleet, nodes = strategy_for(n)
    rounds = Rounds()
    strategy = FimiFedAvg(fleet.system, "fimi", fleet.profiles, node_wait_s=0.0, on_round_metrics=rounds,
                          **settings)
    strategy.rounds = rounds
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    assert sorted(strategy._planned) == nodes
    return strategy, nodes


def update_of(scale: float, seed: int) -> list[np.ndarray]:
    """An update shaped like GLOBAL, its values of the order of `scale`."""
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=g.shape)).astype(np.float32) for g in GLOBAL]


def merged_update(arrays: ArrayRecord) -> list[np.ndarray]:
    """What the strategy added to the global model this round."""
    return [new - old for new, old in zip(arrays.to_numpy_ndarrays(), GLOBAL)]


def test_median_is_the_coordinate_wise_median_whatever_the_weights():
    strategy, nodes = planned_strategy(3, aggregation="median", norm_bound=0)
    updates = [update_of(1.0, seed) for seed in range(3)]
    replies = [reply_to(node, update, weight=w, bits=32) for node, update, w in zip(nodes, updates, (3, 1000, 3))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["updates"] == 3
    for got, layers in zip(merged_update(arrays), zip(*updates)):
        assert np.allclose(got, np.median(np.stack(layers), axis=0), atol=1e-6)
        assert not np.allclose(got, np.average(np.stack(layers), axis=0, weights=[3, 1000, 3]), atol=1e-3)


def test_trimmed_mean_cuts_beta_of_each_tail_of_every_coordinate():
    strategy, nodes = planned_strategy(5, aggregation="trimmed-mean", trim_beta=0.2, norm_bound=0)
    updates = [update_of(1.0, seed) for seed in range(5)]
    arrays, _ = strategy.aggregate_train(1, [reply_to(node, update, bits=32) for node, update in zip(nodes, updates)])
    for got, layers in zip(merged_update(arrays), zip(*updates)):
        # int(0.2 x 5) = 1 value cut from each end of every coordinate, the middle 3 averaged
        middle = np.sort(np.stack(layers).astype(np.float64), axis=0)[1:-1]
        assert np.allclose(got, middle.mean(axis=0), atol=1e-6)


def test_fedavg_weighs_each_update_by_its_num_examples():
    strategy, nodes = planned_strategy(3, norm_bound=0)
    assert strategy.aggregation == "fedavg"
    updates = [update_of(1.0, seed) for seed in range(3)]
    weights = (60, 30, 10)  # D_loc + D_gen of each node
    replies = [reply_to(node, update, weight=w, bits=32) for node, update, w in zip(nodes, updates, weights)]
    arrays, _ = strategy.aggregate_train(1, replies)
    for got, layers in zip(merged_update(arrays), zip(*updates)):
        assert np.allclose(got, np.average(np.stack(layers), axis=0, weights=weights), atol=1e-6)


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed-mean"])
def test_the_norm_bound_drops_a_hundredfold_update_with_its_reason_and_keeps_the_honest(aggregation):
    strategy, nodes = planned_strategy(5, aggregation=aggregation, norm_bound=10.0)
    honest = [update_of(1.0, seed) for seed in range(4)]
    poisoned = [100.0 * layer for layer in update_of(1.0, 9)]
    replies = [reply_to(node, update, bits=32) for node, update in zip(nodes, [*honest, poisoned])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["updates"] == 4 and metrics["dropped"] == metrics["dropped-norm"] == 1
    rows = strategy.rounds.nodes[1]
    assert [row["status"] for row in rows] == ["used"] * 4 + ["dropped"]
    assert "exceeds the bound" in rows[4]["reason"] and "median" in rows[4]["reason"]
    assert rows[4]["bits"] is None and rows[4]["reply_bytes"] > 0  # sent, never merged nor accounted
    # what is merged is the honest four under the same rule
    reference, _ = planned_strategy(4, aggregation=aggregation, norm_bound=0)
    expected, _ = reference.aggregate_train(1, [reply_to(node, update, bits=32) for node, update in zip(nodes, honest)])
    for got, want in zip(arrays.to_numpy_ndarrays(), expected.to_numpy_ndarrays()):
        assert np.allclose(got, want)


def test_no_norm_screening_below_three_updates_nor_when_switched_off():
    strategy, nodes = planned_strategy(2, norm_bound=10.0)
    _, metrics = strategy.aggregate_train(1, [reply_to(nodes[0], update_of(1.0, 0), bits=32),
                                              reply_to(nodes[1], update_of(100.0, 1), bits=32)])
    assert metrics["updates"] == 2 and metrics["dropped-norm"] == 0
    strategy, nodes = planned_strategy(4, norm_bound=0)
    updates = [update_of(1.0, 0), update_of(1.0, 1), update_of(1.0, 2), update_of(1e4, 3)]
    _, metrics = strategy.aggregate_train(1, [reply_to(n, u, bits=32) for n, u in zip(nodes, updates)])
    assert metrics["updates"] == 4 and metrics["dropped"] == 0


def test_a_second_reply_from_the_same_node_is_dropped_and_the_first_stands():
    strategy, nodes = planned_strategy(3, norm_bound=0)
    first, second = update_of(1.0, 0), update_of(5.0, 1)
    replies = [reply_to(nodes[0], first, bits=32), reply_to(nodes[1], first, bits=32),
               reply_to(nodes[2], first, bits=32), reply_to(nodes[0], second, bits=32)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["updates"] == 3 and metrics["dropped"] == metrics["dropped-duplicate"] == 1
    for got, want in zip(merged_update(arrays), first):
        assert np.allclose(got, want, atol=1e-6), "only the first reply of each node is merged"
    rows = strategy.rounds.nodes[1]
    assert [(row["node"], row["status"]) for row in rows] == [(n, "used") for n in nodes] + [(nodes[0], "dropped")]
    assert rows[3]["reason"].startswith("duplicate") and rows[3]["reply_bytes"] > 0
    assert metrics["uplink-bytes"] == sum(row["reply_bytes"] for row in rows), "the duplicate's bytes were sent"


def test_rounds_csv_counts_the_drops_by_class_and_drops_csv_gives_their_reasons(tmp_path):
    assert DROPPED_BY_CLASS == tuple(f"dropped_{kind.replace('-', '_')}" for kind in DROP_CLASSES)
    strategy, nodes = planned_strategy(5, norm_bound=10.0)
    report = RunReport(tmp_path, {"policy": "fimi"})
    strategy.on_round_metrics = report.round_costs
    replies = [reply_to(nodes[0], update_of(1.0, 0), bits=32), reply_to(nodes[1], update_of(1.0, 1), bits=32),
               reply_to(nodes[2], update_of(1.0, 2), bits=32), reply_to(nodes[3], update_of(100.0, 3), bits=32),
               reply_to(nodes[0], update_of(1.0, 4), bits=32), reply_to(nodes[4], None, raw=b"not a payload")]
    strategy.aggregate_train(1, replies)
    report.add_round(1, {"accuracy": 0.5, "loss": 1.0})
    (row,) = read_rounds(tmp_path / "rounds.csv")
    assert row["updates"] == 3 and row["dropped"] == 3
    by_class = {key: row[key] for key in DROPPED_BY_CLASS}
    assert by_class == {"dropped_no_reply": 0, "dropped_unusable": 1, "dropped_norm": 1, "dropped_duplicate": 1,
                        "dropped_offline": 0}
    labels = {str(strategy.profiles[n].get("partition_id", n)) for n in (nodes[3], nodes[4])}
    assert set(row["dropped_nodes"].split(";")) == labels, "a node whose first update was merged is not named"
    drops = (tmp_path / "drops.csv").read_text()
    assert "exceeds the bound" in drops and "duplicate" in drops and "undecodable" in drops


@pytest.mark.parametrize("settings,message", [
    (dict(aggregation="krum"), "unknown aggregation 'krum'"),
    (dict(aggregation="trimmed-mean", trim_beta=0.5), r"trim-beta 0.5 is outside \[0, 0.5\)"),
    (dict(trim_beta=-0.1), "trim-beta -0.1"),
    (dict(norm_bound=-1.0), "norm-bound -1.0"),
    (dict(norm_bound=float("nan")), "norm-bound nan"),
])
def test_bad_settings_are_refused_when_the_strategy_is_built(settings, message):
    fleet, _ = strategy_for(2)
    with pytest.raises(ValueError, match=message):
        FimiFedAvg(fleet.system, "fimi", fleet.profiles, **settings)


def test_the_run_config_carries_the_settings_to_the_strategy():
    run = RunConfig.from_run_config({"aggregation": "trimmed-mean", "trim-beta": 0.1, "norm-bound": 0})
    assert (run.aggregation, run.trim_beta, run.norm_bound) == ("trimmed-mean", 0.1, 0.0)
    defaults = RunConfig()
    assert (defaults.aggregation, defaults.trim_beta, defaults.norm_bound) == ("fedavg", 0.2, 10.0)
