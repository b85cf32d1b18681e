"""Priced offloading in the federated run (issue 24, item 4): the server prices sampler steps,
each device takes its best response from its private theta, and rounds.csv settles the game
against the exact solver's oracle. Fast checks of the parts, then real `fedfill run`s (slow)."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfill import contract
from fedfill.config import RunConfig, parse_pricing
from strategies.allocation.offloading import (best_response, device_game, oracle, realised_utility,
                                              simulated_theta, step_capacity)
from strategies.allocation.stackelberg import follower_response, solve_price
from strategies.pricing import RoundPricing

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def test_pricing_settings_parse_and_bad_ones_say_what_would_work():
    assert parse_pricing("off") == ("off", 0.0) and parse_pricing("fixed:0.25") == ("fixed", 0.25)
    assert parse_pricing("gdm") == ("gdm", 0.0)
    for bad in ("fixed:-1", "fixed:nan", "fixed:inf", "fixed:", "fixed:x", "cheap"):
        with pytest.raises(ValueError, match="--pricing"):
            parse_pricing(bad)
    assert RunConfig().pricing == "off" and RunConfig().synthetic_refresh == 0.0


def test_a_simulated_devices_entry_price_lies_inside_the_servers_cost():
    """theta = e (1 + C) kappa puts the first step's threshold just above e kappa, in (0, kappa)."""
    for partition in range(20):
        capacity = step_capacity(1.5e9, 0.5, 88_000.0)
        theta = simulated_theta(3, partition, capacity, 2.0)
        assert theta == simulated_theta(3, partition, capacity, 2.0)
        entry = device_game(theta, capacity, 50, STEPS).thresholds(0)[0]
        assert 0.02 * 2.0 <= entry < 0.61 * 2.0
        assert best_response(entry * 0.999, theta, capacity, 50, STEPS) == 0
        assert best_response(entry, theta, capacity, 50, STEPS) >= 1


def test_a_devices_response_is_its_best_and_the_oracle_the_exact_solver():
    rng = np.random.default_rng(0)
    thetas, capacities, images = rng.uniform(100, 2000, 4), rng.uniform(2000, 6000, 4), np.array([115, 0, 40, 284])
    price, utility = oracle(thetas, capacities, images, STEPS, 1.0, 5.0)
    playing = images > 0
    game = device_game(thetas[playing], capacities[playing], images[playing], STEPS, 1.0, 5.0)
    assert price == solve_price(game).price
    responses = [best_response(price, t, c, m, STEPS) for t, c, m in zip(thetas, capacities, images)]
    assert responses[1] == 0 and np.array_equal(np.array(responses)[playing], follower_response(game, price))
    assert utility == pytest.approx(realised_utility(price, responses, images, STEPS, 1.0, 5.0))
    for k_n, (t, c, m) in zip(responses, zip(thetas, capacities, images)):  # no step more or less pays it
        if m:
            u = [price * k * m + t * np.log(1 + c - m * k) for k in range(STEPS + 1) if m * k < 1 + c]
            assert u[k_n] >= max(u) - 1e-9 * abs(max(u))


def profiles(n=3):
    return {100 + i: {"gen_capacity": 3000.0 + 500 * i, contract.PARTITION_FIELD: i} for i in range(n)}


def test_the_round_is_settled_from_the_replies_and_the_oracle_beats_the_fixed_price():
    nodes = profiles()
    thetas = {n: simulated_theta(0, p["partition_id"], p["gen_capacity"], 1.0) for n, p in nodes.items()}
    pricing = RoundPricing("fixed", profiles=nodes, steps=STEPS, server_cost=1.0, revenue=0.0, refresh=0.2,
                           fixed_price=0.3, thetas=thetas)
    planned = {100: 115, 101: 95, 102: 284}
    assert pricing.price_round(1, planned) == 0.3
    replies = {n: {"gen-images": m, "d-gen-used": m,
                   "gen-local-steps": best_response(0.3, thetas[n], nodes[n]["gen_capacity"], m, STEPS)}
               for n, m in planned.items()}
    figures = pricing.settle(replies)
    k = np.array([replies[n]["gen-local-steps"] for n in planned])
    m = np.array(list(planned.values()))
    assert figures["gen-device-steps"] == int((k * m).sum()) and figures["gen-server-steps"] == int(((20 - k) * m).sum())
    assert figures["gen-payments"] == pytest.approx(0.3 * (k * m).sum())
    assert figures["leader-utility"] <= figures["leader-utility-oracle"]
    # the next round reuses what each held and regenerates a fifth of it
    assert pricing.predicted_images(100, 115) == 23 and pricing.predicted_images(102, 300) == 16 + 57


def test_exact_prices_at_the_oracle_and_a_learned_pricer_reads_no_theta():
    from strategies.learned.envs import GameDraw
    from strategies.learned.pricers import train_pricer

    nodes = profiles()
    thetas = {n: simulated_theta(0, p["partition_id"], p["gen_capacity"], 1.0) for n, p in nodes.items()}
    planned = {100: 115, 101: 95, 102: 284}
    exact = RoundPricing("exact", profiles=nodes, steps=STEPS, server_cost=1.0, revenue=0.0, refresh=0.0,
                         thetas=thetas)
    expected = oracle(list(thetas.values()), [p["gen_capacity"] for p in nodes.values()], list(planned.values()),
                      STEPS, 1.0, 0.0)
    assert exact.price_round(1, planned) == expected[0]
    random = RoundPricing("random", profiles=nodes, steps=STEPS, server_cost=1.0, revenue=0.0, refresh=0.0,
                          pricer=train_pricer("random", GameDraw(devices=3, integer=True), 0), thetas=None)
    assert random.price_round(1, planned) == 0.5  # the opening price
    random.settle({n: {"gen-images": m, "d-gen-used": m, "gen-local-steps": 3} for n, m in planned.items()})
    prices = {random.price_round(r, planned) for r in range(2, 6)}
    assert all(0 <= p <= 1.0 for p in prices) and len(prices) > 1


def run_fedfill(out, *flags, rounds=2, nodes=3):
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", str(nodes), "--rounds", str(rounds),
                           "--out", str(out), "--timeout", "400", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / "devices.csv") as fh:
        devices = list(csv.DictReader(fh))
    return rows, devices


@pytest.mark.slow
def test_a_fixed_price_moves_each_devices_best_response_and_refresh_makes_the_game_recur(tmp_path):
    """fedfill run --pricing fixed:0.3 --synthetic-refresh 0.2: every round each device runs
    the stackelberg best response of its own theta at 0.3, on its fill and then on its fifth
    regenerated; the service ran the rest; payments and utilities settle in rounds.csv."""
    rows, devices = run_fedfill(tmp_path, "--pricing", "fixed:0.3", "--delivery", "state", "--delivery-state-bits",
                                "32", "--synthetic-refresh", "0.2")
    with open(tmp_path / "profiles.json") as fh:
        import json
        profiled = json.load(fh)
    for row in rows[1:]:
        mine = [d for d in devices if d["round"] == row["round"]]
        assert float(row["gen_price"]) == 0.3 and all(float(d["gen_price"]) == 0.3 for d in mine)
        assert all(int(d["gen_images"]) > 0 for d in mine), "refresh: every round generates"
        for d in mine:
            profile = profiled[d["node"]]
            assert "theta" not in " ".join(profile)  # private: never in the profile
            theta = simulated_theta(0, int(d["partition_id"]), profile["gen_capacity"], 1.0)
            k = best_response(0.3, theta, profile["gen_capacity"], int(d["gen_images"]), STEPS)
            assert int(d["gen_local_steps"]) == k
            assert int(d["gen_device_unet_evals"]) == 2 * k * int(d["gen_images"])
            assert float(d["gen_payment"]) == pytest.approx(0.3 * k * int(d["gen_images"]))
        k_m = sum(int(d["gen_local_steps"]) * int(d["gen_images"]) for d in mine)
        m = sum(int(d["gen_images"]) for d in mine)
        assert int(row["gen_device_steps"]) == k_m and int(row["gen_server_steps"]) == STEPS * m - k_m
        assert float(row["leader_utility"]) <= float(row["leader_utility_oracle"]) + 1e-9
    assert int(rows[2]["gen_device_steps"]) + int(rows[2]["gen_server_steps"]) < \
        0.5 * (int(rows[1]["gen_device_steps"]) + int(rows[1]["gen_server_steps"]))
    assert int(rows[1]["gen_device_steps"]) > 0 and int(rows[1]["gen_server_steps"]) > 0


@pytest.mark.slow
def test_exact_pricing_is_the_oracle_and_leaves_accuracy_as_pricing_off(tmp_path):
    """--pricing exact on a fill round prices at the oracle and realises its utility; with a
    32-bit hand-off every image is the service's own, so accuracy is pricing off's to the digit."""
    priced, _ = run_fedfill(tmp_path / "exact", "--pricing", "exact", "--delivery", "state",
                            "--delivery-state-bits", "32", rounds=1)
    off, _ = run_fedfill(tmp_path / "off", rounds=1)
    assert float(priced[1]["leader_utility"]) == pytest.approx(float(priced[1]["leader_utility_oracle"]), rel=1e-12)
    assert int(priced[1]["gen_device_steps"]) > 0
    assert priced[1]["accuracy"] == off[1]["accuracy"] and off[1]["gen_price"] == ""


@pytest.mark.parametrize("settings, reason", [
    ({"pricing": "fixed:-2"}, "fixed:P needs a finite price P >= 0"),
    ({"pricing": "auction"}, "choose one of off, exact, gdm, ppo, random or fixed:P"),
    ({"pricing": "exact", "delivery": "image"}, "add --delivery state, not --delivery image"),
    ({"synthetic_refresh": 1.5}, "--synthetic-refresh 1.5: must be a fraction in [0, 1]"),
    ({"pricing_server_cost": 0.0}, "--pricing-server-cost 0.0: must be a positive finite cost"),
    ({"pricing_budget_s": float("nan")}, "--pricing-budget-s nan: must be a positive number of seconds"),
    ({"pricing": "exact", "pricer": "somewhere"}, "only --pricing gdm or ppo reads a pricer"),
    ({"pricing": "gdm", "pricer": "/nonexistent"}, "not a pricer checkpoint"),
    ({"generator_checkpoint": str(ROOT / "generation/checkpoints/digits-gan")}, "no sampler steps to share"),
])
def test_pricing_it_cannot_play_is_refused_before_the_run(settings, reason):
    from commands.checks import check_settings
    from fedfill.errors import UsageError

    job = RunConfig(**{"pricing": "fixed:0.3", "delivery": "state", **settings})
    with pytest.raises(UsageError) as err:
        check_settings(job)
    assert reason in str(err.value)


def test_run_refuses_a_pricer_for_another_number_of_devices(tmp_path):
    """The command itself: exit 2 with the reason, before any process starts."""
    from strategies.learned.envs import GameDraw
    from strategies.learned.pricers import save_pricer, train_pricer

    save_pricer(train_pricer("ppo", GameDraw(devices=4, integer=True), 64), tmp_path / "ppo4")
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--nodes", "3", "--pricing", "ppo", "--delivery",
                           "state", "--pricer", str(tmp_path / "ppo4"), "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "trained for 4 devices, the run has 3" in done.stderr, done.stderr[-500:]
