"""The time-split hook (a callable beside the named searches) and the GDM that plugs into it.

The hook keeps torch out of strategies.allocation: these tests hold that a callable's answer
passes the same feasibility check as the named searches, and that a learned search can never
beat the Lagrangian one, which reaches the KKT point of a convex problem.
"""

from __future__ import annotations

import numpy as np
import pytest

from strategies.allocation import solve_plan
from strategies.allocation.fimi import (CrossEntropySettings, FimiProblem, SearchTrace, feasible_start,
                                        round_energy, search_time_split)
from strategies.allocation.presets import fimi_scenario

torch = pytest.importorskip("torch")

from strategies.learned.time_split import (INFEASIBLE_REWARD, TimeSplitEnv, action_to_eta,  # noqa: E402
                                           train_time_split_gdm)


def split(problem, search):
    return search_time_split(problem, search, np.random.default_rng(0), CrossEntropySettings(), SearchTrace())


@pytest.fixture(scope="module")
def problem():
    return FimiProblem.build(fimi_scenario(5, 3))


@pytest.fixture(scope="module")
def trained():
    """A GDM trained briefly: enough to answer, not to be good."""
    from strategies.learned.gdm import GdmSettings
    return train_time_split_gdm(5, env_steps=32, seed=0, samples=8,
                                settings=GdmSettings(hidden=64, batch=32, updates_per_step=2))


def test_the_hook_takes_a_callable_and_checks_its_answer(problem):
    start = feasible_start(problem)
    assert np.array_equal(split(problem, lambda p: start), start)
    eta_min, _ = problem.eta_bounds()
    assert split(problem, lambda p: 0.5 * eta_min) is None  # cannot train its local data: infeasible
    assert split(problem, lambda p: None) is None
    assert split(problem, lambda p: np.full(5, np.nan)) is None
    with pytest.raises(ValueError, match="one eta per device"):
        split(problem, lambda p: start[:3])
    with pytest.raises(ValueError, match="unknown search"):
        split(problem, "gdm")


def test_solve_plan_passes_a_callable_through(problem):
    scenario = problem.scenario
    start = feasible_start(problem)
    plan = solve_plan(scenario, "fimi", search=lambda p: start)
    assert plan.feasible and np.allclose(plan.eta, start)
    assert plan.energy_j == pytest.approx(float(round_energy(problem, start)[0]), rel=1e-12)
    assert solve_plan(scenario, "fimi").energy_j <= plan.energy_j
    infeasible = solve_plan(scenario, "fimi", search=lambda p: 0.5 * p.eta_bounds()[0])
    assert not infeasible.feasible and infeasible.reasons


def test_env_rewards_scale_by_the_reference_and_punish_infeasible_splits():
    env = TimeSplitEnv(5, batch=3, seed=1)
    states = env.reset()
    assert states.shape == (3, env.observation_size) and states.dtype == np.float32
    _, rewards, done = env.step(np.full((3, 5), -1.0))  # every device at eta_min: no time to spare
    assert done
    assert np.all(rewards == INFEASIBLE_REWARD) or np.all(rewards > INFEASIBLE_REWARD)
    # the reference split itself earns exactly -1
    lam = np.linspace(0.02, 0.98, 49)
    actions = []
    for p in env.problems:
        eta_min, eta_max = p.eta_bounds()
        k = int(np.argmin(round_energy(p, eta_min + lam[:, None] * (eta_max - eta_min))))
        actions.append(np.full(5, 2 * lam[k] - 1))
    _, rewards, _ = env.step(np.stack(actions))
    assert np.allclose(rewards, -1.0)


def test_a_trained_gdm_answers_in_bounds_and_never_beats_the_lagrangian_search(trained, problem):
    eta = trained(problem)
    eta_min, eta_max = problem.eta_bounds()
    assert eta.shape == (5,) and np.all(eta >= eta_min) and np.all(eta <= eta_max)
    assert np.array_equal(trained(problem), eta)  # seeded: a plan is reproducible
    # best of 8 samples: a feasible one is among them even for a barely trained actor
    energy = float(round_energy(problem, eta)[0])
    assert np.isfinite(energy)
    optimum = float(round_energy(problem, split(problem, "lagrangian"))[0])
    assert energy / optimum >= 1 - 1e-9
    plan = solve_plan(problem.scenario, "fimi", search=trained)
    assert plan.feasible and plan.energy_j / optimum >= 1 - 1e-9


def test_action_maps_onto_the_bounds(problem):
    eta_min, eta_max = problem.eta_bounds()
    assert np.allclose(action_to_eta(problem, -np.ones(5)), eta_min)
    assert np.allclose(action_to_eta(problem, np.ones(5)), eta_max)
    assert np.allclose(action_to_eta(problem, 3 * np.ones(5)), eta_max)


def test_a_policy_serves_one_device_count(trained):
    with pytest.raises(ValueError, match="serves 5 devices"):
        trained(FimiProblem.build(fimi_scenario(4, 0)))
