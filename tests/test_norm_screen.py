"""Issue 26, item 2: a norm screen that knows convergence (strategies.screening), in the strategy
and in the run's settings; and `--attack` / `--attackers`, the experiments' poisoned updates.

The norms below are shaped like digits' (bench/bench_robust.py, docs/running.md): round
medians near 1 while the model learns, 10-15x smaller once it has converged, an honest
straggler up to 30x its round's median then."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from commands.checks import check_settings
from fedfill.config import RunConfig, check_attack, parse_attack
from fedfill.errors import UsageError
from server.report import RunReport, read_nodes, read_rounds
from strategies.screening import NormScreen
from tests.test_fimi_strategy import GLOBAL, OnlineNodes, reply_to
from tests.test_robust_aggregation import merged_update, planned_strategy, update_of

LEARNING = [1.0, 0.9, 1.1, 0.8, 1.2, 1.0, 0.95, 1.05, 0.9, 1.1]  # a round while the model learns
CONVERGED = [0.05, 0.04, 0.06, 0.05, 0.05, 0.07, 0.04, 0.05, 0.045, 1.5]  # the last: an honest straggler, 30x


def test_the_median_rule_drops_a_converged_models_honest_straggler():
    screen = NormScreen("median", 10.0)
    screen.judge(LEARNING)
    verdicts = screen.judge(CONVERGED)
    assert [v.scale for v in verdicts[:-1]] == [1.0] * 9
    assert verdicts[-1].scale == 0.0 and "exceeds the bound 0.5 " in verdicts[-1].reason


def test_the_adaptive_rule_merges_the_straggler_at_the_bound_and_still_drops_a_hundredfold_update():
    screen = NormScreen("adaptive", 10.0, floor=2.0)
    early = screen.judge([*LEARNING[:-1], 100 * LEARNING[-1]])  # while learning: the medians agree, x100 dropped
    assert early[-1].scale == 0.0 and [v.scale for v in early[:-1]] == [1.0] * 9
    late = screen.judge([*CONVERGED[:-2], 100 * CONVERGED[-2], CONVERGED[-1]])
    median = float(np.median([*CONVERGED[:-2], 100 * CONVERGED[-2], CONVERGED[-1]]))
    straggler = late[-1]
    assert straggler.scale == pytest.approx(10 * median / CONVERGED[-1]) and "clipped" in straggler.reason
    assert late[-2].scale == 0.0 and "largest round median so far" in late[-2].reason  # 4.5 > 2 x 1.0
    assert screen.last == {"norm-median": median, "norm-bound": 10 * median}
    assert screen.peak_median == pytest.approx(1.0)


def test_the_clip_rule_scales_every_update_above_the_bound_down_to_it_and_drops_none():
    screen = NormScreen("clip", 10.0)
    verdicts = screen.judge([1.0, 1.0, 1.0, 50.0])
    assert [v.scale for v in verdicts] == [1.0, 1.0, 1.0, pytest.approx(10.0 / 50.0)]


@pytest.mark.parametrize("rule", ["median", "adaptive", "clip"])
def test_no_rule_judges_fewer_than_three_updates_a_zero_median_or_a_switched_off_bound(rule):
    assert [v.scale for v in NormScreen(rule, 10.0).judge([1.0, 1e6])] == [1.0, 1.0]
    assert [v.scale for v in NormScreen(rule, 10.0).judge([0.0, 0.0, 0.0, 5.0])] == [1.0] * 4
    assert [v.scale for v in NormScreen(rule, 0.0).judge([1.0, 1.0, 1e6])] == [1.0] * 3


@pytest.mark.parametrize("rule", ["median", "adaptive", "clip"])
def test_a_norm_that_is_not_finite_is_dropped_never_scaled(rule):
    verdicts = NormScreen(rule, 10.0).judge([1.0, 1.0, 1.0, float("inf"), float("nan")])
    assert [v.scale for v in verdicts] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert "not finite" in verdicts[-1].reason


@pytest.mark.parametrize("rule,bound,message", [
    ("krum", 10.0, "unknown norm screen 'krum'"), ("median", -1.0, "norm-bound -1.0"),
    ("adaptive", float("nan"), "norm-bound nan"), ("clip", float("inf"), "norm-bound inf")])
def test_bad_screens_are_refused(rule, bound, message):
    with pytest.raises(ValueError, match=message):
        NormScreen(rule, bound)


@pytest.mark.usefixtures("inside_a_flower_run")
def test_the_strategy_merges_a_clipped_update_at_the_bound_and_the_report_shows_it(tmp_path):
    strategy, nodes = planned_strategy(4, norm_bound=10.0, norm_screen="clip")
    report = RunReport(tmp_path, {"policy": "fimi"})
    strategy.on_round_metrics = report.round_costs
    direction = update_of(1.0, 7)
    norm_of = lambda update: float(np.sqrt(sum(np.sum(np.square(u, dtype=np.float64)) for u in update)))  # noqa: E731
    updates = [[u * (1.0 / norm_of(direction)) for u in update_of(1.0, seed)] for seed in range(3)]
    honest_norms = [norm_of(u) for u in updates]
    large = [u * (100.0 / norm_of(direction)) for u in direction]
    arrays, metrics = strategy.aggregate_train(1, [reply_to(n, u, bits=32) for n, u in zip(nodes, [*updates, large])])
    assert metrics["updates"] == 4 and metrics["dropped"] == 0 and metrics["clipped"] == 1
    bound = 10.0 * float(np.median([*honest_norms, 100.0]))
    assert metrics["norm-bound"] == pytest.approx(bound)
    # FedAvg of equal weights: the clipped update enters as direction x bound / 100
    expected = [np.mean([*layers, big * bound / 100.0], axis=0) for *layers, big in zip(*updates, large)]
    for got, want in zip(merged_update(arrays), expected):
        assert np.allclose(got, want, atol=1e-5)
    report.add_round(1, {"accuracy": 0.5, "loss": 1.0})
    (row,) = read_rounds(tmp_path / "rounds.csv")
    assert row["clipped"] == 1 and row["norm_bound"] == pytest.approx(bound) and row["dropped_norm"] == 0
    rows = read_nodes(tmp_path / "devices.csv")
    assert [r["status"] for r in rows] == ["used"] * 4 and "clipped to" in rows[3]["reason"]


@pytest.mark.usefixtures("inside_a_flower_run")
def test_the_adaptive_screen_remembers_the_largest_median_across_rounds():
    strategy, nodes = planned_strategy(5)  # the defaults: adaptive, 10
    assert strategy.screen.rule == "adaptive" and strategy.screen.bound == 10.0
    strategy.aggregate_train(1, [reply_to(n, update_of(1.0, k), bits=32) for k, n in enumerate(nodes)])
    peak = strategy.screen.peak_median
    strategy.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord(), OnlineNodes(nodes))
    small = [update_of(0.02, k) for k in range(4)]
    straggler = update_of(0.6, 9)  # 30x the round's median, far under 2 x the peak
    _, metrics = strategy.aggregate_train(2, [reply_to(n, u, bits=32) for n, u in zip(nodes, [*small, straggler])])
    assert metrics["dropped"] == 0 and metrics["clipped"] == 1 and strategy.screen.peak_median == peak


def test_an_attack_is_a_factor_and_its_attackers_fewer_than_the_nodes():
    assert parse_attack("scale:-100") == -100.0 and parse_attack("sign-flip") == -1.0
    for spec in ("scale:1", "scale:inf", "scale:nan", "scale:", "flip", "scale:x"):
        with pytest.raises(ValueError, match=f"--attack {spec}"):
            parse_attack(spec)
    check_attack("", 0, 10)
    check_attack("scale:-10", 9, 10)
    for attack, attackers, message in (("sign-flip", 0, "K must be in 1..9"), ("sign-flip", 10, "K must be in 1..9"),
                                       ("", 2, "name the attack too")):
        with pytest.raises(ValueError, match=message):
            check_attack(attack, attackers, 10)


@pytest.mark.parametrize("settings,message", [
    (dict(attack="scale:-100", attackers=10), "--attackers 10"),
    (dict(attack="scale:1", attackers=1), "--attack scale:1"),
    (dict(attackers=1), "name the attack too"),
    (dict(norm_screen="trim"), "unknown norm screen 'trim'"),
])
def test_the_pre_run_checks_refuse_bad_attacks_and_screens(settings, message):
    with pytest.raises(UsageError, match=message):
        check_settings(RunConfig(num_partitions=10, **settings))


@pytest.mark.usefixtures("inside_a_flower_run")
def test_an_attacker_node_sends_its_honest_update_times_the_factor_and_the_others_are_untouched():
    from client.app import train
    from fedfill import codec, contract
    from flwr.app import Context, Message, MessageType, RecordDict
    from jobs import load_job

    honest_run = RunConfig(local_epochs=1, num_partitions=4)
    attacked_run = RunConfig(local_epochs=1, num_partitions=4, attack="scale:-100", attackers=1)
    plan = contract.NodePlan(server_round=1, policy="fimi", d_gen=0, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5,
                             bits=32, t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1)
    content = contract.train_message_content(ArrayRecord(load_job(honest_run).initial_weights()), plan, ConfigRecord())

    def update(run: RunConfig, partition: int) -> tuple[list[np.ndarray], str]:
        context = Context(1, 7, {"partition-id": partition, "num-partitions": 4, "threads": 1}, RecordDict(),
                          run.to_run_config())
        payload, _, note = contract.read_train_reply(
            train(Message(content, message_type=MessageType.TRAIN, dst_node_id=7), context).content)
        return codec.decode(payload), note

    (honest, _), (attacked, note) = update(honest_run, 0), update(attacked_run, 0)
    assert "attacker: scale:-100" in note
    for h, a in zip(honest, attacked):
        assert np.allclose(a, -100.0 * h, rtol=1e-5, atol=1e-7)
    (other, _), (same, note) = update(honest_run, 1), update(attacked_run, 1)
    assert "attacker" not in note and all(np.array_equal(o, s) for o, s in zip(other, same))
