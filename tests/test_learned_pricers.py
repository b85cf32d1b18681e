"""The learned leaders of [GenMEN]'s pricing game: what the leader may see, the rewards, a
short GDM and PPO training against the exact optimum, checkpoints, and `fedfill price`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from strategies.allocation.stackelberg import GameError, PricingGame, follower_response, solve_price
from strategies.allocation.offloading import device_game
from strategies.learned.envs import GameDraw, PricingEnv, check_draw, narrow, no_bounds, normalised_utility, observe
from strategies.learned.pricers import PricerError, load_pricer, play, save_pricer, train_pricer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {"server_cost": 0.6, "revenue": 40, "integer": False,
           "devices": [{"theta": t, "capacity": c, "unit_cost": 0.358, "fixed_cost": 0.116, "units": 12}
                       for t, c in zip([1.0, 1.5, 0.8], [3.0, 4.5, 6.0])]}


def held_out(devices: int, count: int = 40, seed: int = 999) -> list[PricingGame]:
    rng = np.random.default_rng(seed)
    return [GameDraw(devices=devices).draw(rng) for _ in range(count)]


def test_the_leaders_state_reads_no_theta():
    game = GameDraw(devices=4).draw(np.random.default_rng(0))
    other = PricingGame(theta=game.theta * 3, capacity=game.capacity, unit_cost=game.unit_cost,
                        fixed_cost=game.fixed_cost, units=game.units, server_cost=game.server_cost)
    responses = follower_response(game, 0.3)
    assert np.array_equal(observe(game, 0.3, responses), observe(other, 0.3, responses))
    # an interior response tells the leader the device's entry price theta / (w A kappa)
    state = observe(game, 0.3, responses)
    y, q = state[1:5], state[0]
    interior = (responses > 0) & (responses < game.cap)
    assert np.allclose((q * (1 - y))[interior], (game.theta / (game.reach * game.server_cost))[interior])


@pytest.mark.parametrize("integer", [False, True])
def test_the_entry_price_bounds_always_hold_the_hidden_entry_price(integer):
    """envs.narrow's bounds, after any sequence of prices, contain each device's entry price
    theta / (w A kappa), which the leader never sees; an interior response pins it down."""
    rng = np.random.default_rng(int(integer))
    fleet = device_game(np.ones(5), rng.uniform(100, 5000, 5), np.ones(5), 20, 1.0)
    narrowed = 0.0
    for trial in range(200):
        draw = GameDraw(devices=5, integer=integer) if trial % 2 else GameDraw.around(fleet, weight_range=(1, 500))
        game = draw.draw(rng)
        game = PricingGame(**{**{k: getattr(game, k) for k in ("theta", "capacity", "unit_cost", "fixed_cost",
                                                                 "units", "server_cost", "weight")},
                              "integer": integer})
        entry = game.theta / (game.weight * game.reach * game.server_cost)
        bounds = no_bounds(5)
        for price in rng.uniform(0, game.server_cost, 8):
            bounds = narrow(game, price, follower_response(game, price), bounds)
            assert np.all(bounds[0] <= entry * (1 + 1e-9))
            assert np.all((entry <= bounds[1] * (1 + 1e-9)) | (entry > 1))
        narrowed += float(np.mean(bounds[1] - bounds[0]))
    assert narrowed / 200 < 0.5  # and they do narrow from [0, 1]


def test_the_normalised_utility_is_zero_without_offloading_and_largest_at_the_optimum():
    for game in held_out(6, 10):
        best = solve_price(game)
        assert normalised_utility(game, 0.0) == 0.0
        grid = np.linspace(0, game.server_cost, 2001)
        assert normalised_utility(game, grid).max() <= normalised_utility(game, best.price) + 1e-12


def test_the_papers_improvement_reward_pays_nothing_for_holding_the_optimum():
    """[GenMEN]'s reward, 1 when U_s rose, earns 0 at a constant price, even the best one: the
    reason the default reward is the utility itself."""
    env = PricingEnv(GameDraw(devices=3), horizon=5, reward="improvement", seed=1)
    env.reset()
    best = np.array([[2 * solve_price(env.games[0]).price / env.games[0].server_cost - 1]])
    rewards = [env.step(best)[1][0] for _ in range(5)]
    assert rewards[1:] == [0.0] * 4
    kept = PricingEnv(GameDraw(devices=3), horizon=5, reward="improvement-vs-best", seed=1)
    kept.reset()
    assert [kept.step(best)[1][0] for _ in range(5)][1:] == [1.0] * 4


@pytest.mark.slow
def test_a_short_gdm_training_prices_held_out_games_near_the_optimum(tmp_path):
    """2,000 steps (seconds on a CPU) of the default GDM: its last price on held-out games,
    whose thetas it never sees, is near the exact optimum and far better than a random price."""
    draw = GameDraw(devices=5)
    gdm = train_pricer("gdm", draw, 2000, seed=0)
    games = held_out(5)
    gdm_regret = play(gdm, games, seed=1).regret
    random_regret = play(train_pricer("random", draw, 0), games, seed=1).regret
    assert gdm_regret.mean() < 0.1 and gdm_regret.mean() < random_regret.mean() / 3
    assert np.all(gdm_regret >= -1e-9)  # the exact solver is the optimum
    loaded = load_pricer(save_pricer(gdm, tmp_path / "gdm"))
    assert loaded.settings == gdm.settings and loaded.env_steps == 2000 and loaded.memory
    assert np.array_equal(play(loaded, games[:5], seed=4).prices, play(gdm, games[:5], seed=4).prices)


def test_ppo_trains_saves_and_loads_with_the_papers_state(tmp_path):
    pytest.importorskip("stable_baselines3")
    ppo = train_pricer("ppo", GameDraw(devices=3), 512, seed=0, memory=False)
    loaded = load_pricer(save_pricer(ppo, tmp_path / "ppo"))
    games = held_out(3, 5)
    first, again = play(ppo, games, seed=2), play(loaded, games, seed=2)
    assert np.array_equal(first.prices, again.prices)
    assert np.all((first.prices >= 0) & (first.prices <= 1)) and loaded.memory is False
    with pytest.raises(PricerError, match="plays games of 3 devices"):  # the paper's state: 1 + 3 N numbers
        loaded.act(np.zeros((1, 16)), np.random.default_rng(0))


def test_bad_requests_are_refused_with_the_reason(tmp_path):
    with pytest.raises(PricerError, match="training steps"):
        train_pricer("gdm", GameDraw(devices=3), 10**9)
    with pytest.raises(PricerError, match="unknown pricer"):
        train_pricer("dqn", GameDraw(devices=3), 10)
    with pytest.raises(PricerError, match="not a pricer checkpoint"):
        load_pricer(tmp_path)
    with pytest.raises(PricerError, match="plays games of 3 devices"):
        train_pricer("random", GameDraw(devices=3), 0).act(np.zeros((1, 13)), np.random.default_rng(0))
    game = PricingGame(theta=np.ones(1001), capacity=np.full(1001, 4.0), unit_cost=np.full(1001, 0.3),
                       fixed_cost=np.zeros(1001), units=np.full(1001, 5.0), server_cost=0.5)
    with pytest.raises(GameError, match="at most 1000 devices"):
        check_draw(game)


def fedfill_price(*args):
    return subprocess.run([sys.executable, "-m", "fedfill", "price", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_price_command_trains_saves_and_replays_a_learned_pricer(tmp_path):
    game = tmp_path / "game.json"
    game.write_text(json.dumps(EXAMPLE))
    trained = fedfill_price(game, "--solver", "gdm", "--train-steps", 200, "--save", tmp_path / "gdm", "--json")
    assert trained.returncode == 0, trained.stderr
    assert "gdm: 200 of 200 steps" in trained.stderr  # progress while it trains
    first = json.loads(trained.stdout)
    assert first["trained_steps"] == 200 and len(first["prices_played"]) == first["rounds_played"]
    assert 0 <= first["price"] <= 0.6 and first["regret"] >= -1e-9
    assert first["optimal_price"] == pytest.approx(0.1989726, abs=1e-7)
    replayed = json.loads(fedfill_price(game, "--solver", "gdm", "--pricer", tmp_path / "gdm", "--json").stdout)
    assert replayed["price"] == first["price"] and replayed["regret"] == first["regret"]
    for args, reason in [(("--solver", "gdm", "--train-steps", 10**8), "--train-steps must be in"),
                         (("--solver", "ppo", "--pricer", tmp_path / "gdm"), "holds a gdm pricer, not ppo"),
                         (("--save", tmp_path / "x"), "--pricer and --save are for")]:
        bad = fedfill_price(game, *args)
        assert bad.returncode == 2 and reason in bad.stderr, bad.stderr
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({**EXAMPLE, "devices": EXAMPLE["devices"] * 2}))
    bad = fedfill_price(bigger, "--solver", "gdm", "--pricer", tmp_path / "gdm")
    assert bad.returncode == 2 and "prices games of 3 devices" in bad.stderr
