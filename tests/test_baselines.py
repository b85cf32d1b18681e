"""The baselines and ablations of [FIMI §V] as the planner, the local step and the strategy
make them: equal bands (w/o BA), uniform requests (w/o OA), a Delta_max out of reach relaxed
to the tightest reachable one, SEMI's pseudo-label loss, SST's server update merged by
Flower's FedAvg, and the run settings that refuse combinations that mean nothing."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedfill.config import RunConfig
from fedfill.errors import UsageError
from strategies.allocation import Scenario, solve_plan
from strategies.allocation.augmentation import augmentation_policy, synthetic_request
from strategies.allocation.policies import error_target_out_of_reach, reachable_delta_max
from strategies.allocation.presets import fimi_scenario


def test_equal_band_gives_every_device_b_over_n_and_costs_at_least_fimi():
    scenario = fimi_scenario(8, 0)
    fimi, equal = solve_plan(scenario, "fimi"), solve_plan(scenario, "fimi-equal-band")
    assert fimi.feasible and equal.feasible
    share = scenario.system.bandwidth_hz / 8
    assert np.allclose(equal.b, share)
    assert not np.allclose(fimi.b, share), "FIMI allocates the band unequally on heterogeneous devices"
    assert np.all(equal.p <= scenario.devices.p_max * (1 + 1e-9))
    assert equal.energy_j >= fimi.energy_j * (1 - 1e-9)
    assert np.all(np.isclose(equal.t_cmp + equal.t_com, scenario.system.t_max_s))


def test_uniform_request_spreads_the_amount_evenly_where_eq47_fills_the_gaps():
    counts = np.array([0, 9, 3, 5])
    uniform = synthetic_request("fimi-uniform", counts, 10)
    assert uniform.sum() == 10 and uniform.max() - uniform.min() <= 1
    assert uniform[0] == 3 and uniform[1] == 2, "the remainder goes to the classes held least"
    assert synthetic_request("fimi", counts, 10).tolist() == augmentation_policy(counts, 10).tolist()
    assert synthetic_request("fimi", counts, 10)[1] == 0, "[FIMI eq. 47] gives nothing to the fullest class"


def test_a_delta_max_out_of_reach_is_relaxed_to_the_tightest_reachable_one():
    from dataclasses import replace

    scenario = fimi_scenario(6, 0)
    tight = Scenario(replace(scenario.system, delta_max=0.01), scenario.devices)
    plan = solve_plan(tight, "fimi")
    assert error_target_out_of_reach(plan)
    reachable = reachable_delta_max(tight, "fimi")
    assert 0.01 < reachable < 1
    at = Scenario(replace(scenario.system, delta_max=reachable), scenario.devices)
    below = Scenario(replace(scenario.system, delta_max=reachable * 0.99), scenario.devices)
    assert solve_plan(at, "fimi").feasible and not solve_plan(below, "fimi").feasible


def test_pseudo_label_loss_counts_only_confident_predictions():
    from fedfill.models import pseudo_label_loss

    model = torch.nn.Linear(4, 3)
    x = torch.randn(32, 4)
    with torch.no_grad():
        model.weight.mul_(10)
    confidence = torch.softmax(model(x), 1).max(1).values
    assert float(pseudo_label_loss(model, x, threshold=1.01).detach()) == 0.0
    with torch.no_grad():
        everything = float(pseudo_label_loss(model, x, threshold=0.0))
        expected = float(torch.nn.functional.cross_entropy(model(x), model(x).argmax(1)))
    assert everything == pytest.approx(expected, rel=1e-6)
    threshold = float(confidence.detach().median())
    with torch.no_grad():
        some = float(pseudo_label_loss(model, x, threshold))
    assert 0.0 < some < everything


def test_semi_training_learns_from_unlabelled_images_only_through_confident_labels():
    from fedfill.models import get_weights, model_for_images, train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 16)
    unlabelled = rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)

    def trained(**kwargs):
        torch.manual_seed(0)
        model = model_for_images(images.shape, 10)
        train(model, images, labels, epochs=2, batch_size=8, seed=1, **kwargs)
        return get_weights(model)

    # the same draws (batches, dropout) in both: only the threshold differs
    never_confident = trained(unlabelled=unlabelled, threshold=1.01)
    assert all(np.array_equal(a, b) for a, b in zip(never_confident, trained(unlabelled=unlabelled, threshold=1.01)))
    semi = trained(unlabelled=unlabelled, threshold=0.0)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(never_confident, semi))


@pytest.mark.usefixtures("inside_a_flower_run")
def test_sst_merges_the_servers_update_as_one_more_reply_weighted_by_its_examples():
    from tests.test_fimi_strategy import GLOBAL, OnlineNodes, reply_to, strategy_for

    strategy, nodes = strategy_for(n=2, policy="tfl")
    server_update = [np.full((3, 2), 10.0, np.float32), np.full(4, -10.0, np.float32)]
    calls = []

    def complementary(weights, server_round):
        calls.append((server_round, [w.copy() for w in weights]))
        return server_update, 20, 0.25

    strategy.complementary_update = complementary
    strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    device = [np.full((3, 2), 1.0, np.float32), np.full(4, 2.0, np.float32)]
    arrays, metrics = strategy.aggregate_train(1, [reply_to(nodes[0], device, weight=10, bits=32),
                                                   reply_to(nodes[1], device, weight=10, bits=32)])
    assert calls and calls[0][0] == 1 and all(np.array_equal(a, b) for a, b in zip(calls[0][1], GLOBAL))
    # devices weigh 10 + 10, the server 20: half the merged update is the server's
    expected = [g + 0.5 * d + 0.5 * s for g, d, s in zip(GLOBAL, device, server_update)]
    assert all(np.allclose(a, b) for a, b in zip(arrays.to_numpy_ndarrays(), expected))
    assert metrics["server-examples"] == 20 and metrics["updates"] == 2, "the server's update is no device's"
    assert metrics["train-loss"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)
    # no device update: nothing merged, not even the server's
    strategy.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    assert strategy.aggregate_train(2, [])[0] is None and len(calls) == 1


@pytest.mark.parametrize("settings, says", [
    ({"synthetic_use": "server", "policy": "fimi"}, "--policy tfl"),
    ({"synthetic_use": "unlabelled", "job": "ddpm"}, "classifier job"),
    ({"synthetic_use": "both"}, "choose one of"),
    ({"delta_max": 1.0}, "--delta-max"),
    ({"delta_max": 0.0}, "--delta-max"),
    ({"pseudo_label_threshold": 0.0}, "--pseudo-label-threshold"),
])
def test_settings_that_mean_nothing_are_refused_before_the_run(settings, says):
    from commands.checks import check_settings

    with pytest.raises(UsageError, match=says.replace("-", r"\-")):
        check_settings(RunConfig(**settings))


def test_semi_without_a_generator_is_refused(capsys):
    from fedfill.cli import main

    assert main(["run", "--synthetic-use", "unlabelled", "--generator", "none", "--out", "/tmp/never"]) == 2
    assert "generation service" in capsys.readouterr().err
