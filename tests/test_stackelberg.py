"""[GenMEN]'s pricing game as reconstructed, solved exactly: the design note's worked example,
brute force over dense price grids, and the followers' own optimality."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from strategies.allocation.stackelberg import (GameError, PricingGame, follower_response, leader_utility,
                                               parse_game, solve_discriminatory, solve_price)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = dict(theta=[1.0, 1.5, 0.8], capacity=[3.0, 4.5, 6.0], unit_cost=[0.358] * 3, fixed_cost=[0.116] * 3,
               units=[12] * 3, server_cost=0.6, revenue=40.0)


def random_game(rng, n: int, integer: bool = False, weighted: bool = False) -> PricingGame:
    """weighted: each unit is 1 to 8 pieces of work (a federated run's m_n images per sampler step)."""
    return PricingGame(weight=rng.integers(1, 9, n) if weighted else None, theta=rng.uniform(0.2, 2.0, n), capacity=rng.uniform(1.0, 8.0, n),
                       unit_cost=rng.uniform(0.1, 0.6, n), fixed_cost=rng.uniform(0.0, 0.5, n),
                       units=rng.integers(4, 16, n), server_cost=float(rng.uniform(0.1, 1.0)), revenue=10.0,
                       integer=integer)


def test_the_worked_example():
    continuous = solve_price(PricingGame(**EXAMPLE))
    assert continuous.price == pytest.approx(0.1989726, abs=1e-7)
    assert continuous.leader_utility == pytest.approx(28.555507, abs=1e-6)
    assert continuous.responses == pytest.approx([5.823344, 7.500379, 12.0], abs=1e-6)
    assert continuous.utility_without_offloading == pytest.approx(18.4)
    whole = solve_price(PricingGame(**EXAMPLE, integer=True))
    assert whole.price == pytest.approx(0.1992551, abs=1e-7) and whole.leader_utility == pytest.approx(28.819368, abs=1e-6)
    assert whole.responses.tolist() == [6, 8, 12]
    prices, utility = solve_discriminatory(PricingGame(**EXAMPLE))
    assert prices == pytest.approx([0.2351676, 0.2446303, 0.1106646], abs=1e-7)
    assert utility == pytest.approx(29.844200, abs=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_no_price_on_a_dense_grid_beats_the_exact_one(seed):
    rng = np.random.default_rng(seed)
    for integer, weighted in ((False, False), (True, False), (False, True), (True, True)):
        game = random_game(rng, int(rng.choice([5, 10, 20])), integer, weighted)
        exact = solve_price(game)
        grid = np.linspace(0.0, 2 * game.server_cost + 1.0, 100_001)
        values = np.concatenate([leader_utility(game, chunk) for chunk in np.array_split(grid, 10)])
        assert values.max() <= exact.leader_utility + 1e-9
        if not integer:  # the optimum may sit at a kink, where U_s is linear: within 1e-6 relative
            assert values.max() >= exact.leader_utility - 1e-6 * abs(exact.leader_utility) - 1e-3
        assert exact.price <= game.server_cost + 1e-12  # a price above the server's own cost never pays
        discriminating = solve_discriminatory(game)[1]
        assert discriminating >= exact.leader_utility - 1e-9


def test_the_integer_optimum_equals_brute_force_over_every_threshold():
    rng = np.random.default_rng(7)
    for trial in range(20):
        game = random_game(rng, 5, integer=True, weighted=trial % 2 == 1)
        thresholds = np.concatenate([game.thresholds(n) for n in range(5)] + [[0.0]])
        assert solve_price(game).leader_utility == pytest.approx(leader_utility(game, thresholds).max(), abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_no_follower_gains_by_a_step_up_or_down(weighted):
    rng = np.random.default_rng(3)
    game = random_game(rng, 10, integer=True, weighted=weighted)
    price = solve_price(game).price
    taken = follower_response(game, price)

    def utility(units):
        return price * game.weight * units + game.theta * np.log(1 + game.capacity - game.unit_cost * units - game.fixed_cost)

    for step in (-1, 1):
        other = taken + step
        allowed = (other >= 0) & (other <= np.floor(game.cap))
        assert np.all(utility(other)[allowed] <= utility(taken)[allowed] + 1e-12)


def test_a_weighted_game_is_the_plain_game_counted_in_pieces_of_work():
    """Continuous: a unit of w pieces at cost a is w pieces at cost a / w each: the same game."""
    rng = np.random.default_rng(11)
    weighted = random_game(rng, 8, weighted=True)
    w = weighted.weight
    plain = PricingGame(theta=weighted.theta, capacity=weighted.capacity, unit_cost=weighted.unit_cost / w,
                        fixed_cost=weighted.fixed_cost, units=weighted.units * w, server_cost=weighted.server_cost,
                        revenue=weighted.revenue)
    a, b = solve_price(weighted), solve_price(plain)
    assert a.price == pytest.approx(b.price, rel=1e-9) and a.leader_utility == pytest.approx(b.leader_utility, rel=1e-9)
    assert a.responses * w == pytest.approx(b.responses, rel=1e-9)


def test_the_price_rises_with_the_servers_own_cost():
    rng = np.random.default_rng(11)
    base = random_game(rng, 10)
    prices = [solve_price(PricingGame(base.theta, base.capacity, base.unit_cost, base.fixed_cost, base.units,
                                      server_cost=k)).price for k in np.linspace(0.05, 2.0, 40)]
    assert np.all(np.diff(prices) >= -1e-12)


@pytest.mark.parametrize("text, reason", [
    ("[", "not a JSON game file"), ("[]", "a JSON object"), ('{"devices": []}', "non-empty list"),
    ('{"server_cost": 1, "devices": [{"theta": 1}]}', "'capacity' must be a number"),
    ('{"server_cost": -1, "devices": [{"theta": 1, "capacity": 2, "unit_cost": 1, "fixed_cost": 0, "units": 3}]}',
     "'server_cost' must be a number in \\[0, 1e\\+15\\]"),
    ('{"server_cost": 1, "devices": [{"theta": 1, "capacity": 0.1, "unit_cost": 1, "fixed_cost": 0.5, "units": 3}]}',
     "capacity 0.1 is below its fixed cost 0.5"),
    ('{"server_cost": 1, "devices": [{"theta": 1e999, "capacity": 2, "unit_cost": 1, "fixed_cost": 0, "units": 3}]}',
     "'theta' must be finite"),
    ('{"server_cost": 1, "devices": [{"theta": 0, "capacity": 2, "unit_cost": 1, "fixed_cost": 0, "units": 3}]}',
     "'theta' must be positive"),
    ('{"server_cost": 1, "integer": true, "devices": [{"theta": 1, "capacity": 1e12, "unit_cost": 1e-6, '
     '"fixed_cost": 0, "units": 1e12}]}', "units in all"),
    ('{"server_cost": 1e308, "devices": [{"theta": 1, "capacity": 2, "unit_cost": 1, "fixed_cost": 0, "units": 3}]}',
     "must be a number in"),
    ('{"server_cost": 1, "devices": [{"theta": 1, "capacity": 2, "unit_cost": 1, "fixed_cost": 0, "units": 1'
     + "0" * 400 + '}]}', "an integer of 401 digits"),
    ('{"server_cost": 1, "devices": [{"theta": 1, "capacity": 2, "unit_cost": 1e-300, "fixed_cost": 0, "units": 3}]}',
     "'unit_cost' must be at least"),
])
def test_a_bad_game_is_refused_with_the_reason(text, reason):
    with pytest.raises(GameError, match=reason):
        parse_game(text)


def test_a_hundred_thousand_devices_solve_in_a_bounded_time():
    rng = np.random.default_rng(0)
    solution = solve_price(random_game(rng, 100_000))
    assert np.isfinite(solution.leader_utility) and solution.leader_utility >= solution.utility_without_offloading


def test_price_command_prints_the_solution_and_a_random_prices_regret(tmp_path):
    game = tmp_path / "game.json"
    game.write_text(json.dumps({"server_cost": 0.6, "revenue": 40, "integer": False,
                                "devices": [{"theta": t, "capacity": c, "unit_cost": 0.358, "fixed_cost": 0.116,
                                             "units": 12} for t, c in zip(EXAMPLE["theta"], EXAMPLE["capacity"])]}))
    exact = subprocess.run([sys.executable, "-m", "fedfill", "price", str(game), "--json"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert exact.returncode == 0, exact.stderr
    result = json.loads(exact.stdout)
    assert result["price"] == pytest.approx(0.1989726, abs=1e-7) and result["regret"] == 0.0
    assert result["responses"] == pytest.approx([5.823344, 7.500379, 12.0], abs=1e-6)
    random = json.loads(subprocess.run([sys.executable, "-m", "fedfill", "price", str(game), "--solver", "random",
                                        "--seed", "3", "--json"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=60).stdout)
    assert 0 <= random["regret"] <= 1.5 and random["leader_utility"] <= result["leader_utility"]
    game.write_text("{}")
    bad = subprocess.run([sys.executable, "-m", "fedfill", "price", str(game)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "'devices' must be a non-empty list" in bad.stderr
