"""Would a wrong solver pass? KKT at the returned point, scipy from many starts, constraints."""

import numpy as np
import pytest

from strategies.allocation import solve_plan
from strategies.allocation.costs import LN2, uplink_rate
from strategies.allocation.fimi import FimiProblem, round_energy, solve_compute, solve_uplink
from strategies.allocation.presets import fimi_scenario
from strategies.allocation.reference import solve_reference
from strategies.allocation.scenario import Scenario, System

REL = 1e-6


def tightened(scenario: Scenario, t_max: float) -> Scenario:
    values = {k: getattr(scenario.system, k) for k in System.__dataclass_fields__}
    values["t_max_s"] = t_max
    return Scenario(System(**values), scenario.devices)


def assert_constraints_hold(scenario: Scenario, plan, synthetic: bool = True):
    sy, dv = scenario.system, scenario.devices
    assert plan.feasible
    assert np.all(plan.f <= dv.f_max * (1 + REL)) and np.all(plan.f > 0)
    assert np.all(plan.p <= dv.p_max * (1 + REL)) and np.all(plan.p > 0)
    assert plan.b.sum() <= sy.bandwidth_hz * (1 + REL)
    assert np.all(plan.d_gen >= 0) and np.all(plan.d_gen <= sy.d_gen_max * (1 + REL))
    # times recomputed from the plan's own f, b, P through the cost model, not taken from it
    samples = dv.d_loc + plan.d_gen
    t_cmp = sy.tau * sy.omega * samples / plan.f
    t_com = sy.model_params * plan.bits / uplink_rate(plan.b, plan.p, dv.gain, sy.noise_w_per_hz)
    assert np.all(t_cmp + t_com <= sy.t_max_s * (1 + REL))
    if synthetic:
        errors = sy.alpha * samples ** (-sy.beta) - sy.gamma
        budget = sy.learning_error_budget(len(dv))
        assert errors.sum() <= budget + REL * abs(budget)


@pytest.mark.parametrize("devices,seed,t_max", [(3, 1, 60.0), (4, 2, 25.0), (5, 3, 60.0), (6, 4, 20.0)])
def test_fimi_is_at_least_as_good_as_scipy_from_many_starts(devices, seed, t_max):
    scenario = tightened(fimi_scenario(devices, seed), t_max)
    plan = solve_plan(scenario, "fimi")
    assert_constraints_hold(scenario, plan)
    reference = solve_reference(FimiProblem.build(scenario), starts=6, seed=seed)
    assert np.isfinite(reference.energy), "scipy found no feasible point: the instance tests nothing"
    assert plan.energy_j <= reference.energy * 1.005


def test_tfl_is_at_least_as_good_as_scipy():
    scenario = tightened(fimi_scenario(5, 7), 30.0)
    plan = solve_plan(scenario, "tfl")
    assert_constraints_hold(scenario, plan, synthetic=False)
    assert np.all(plan.d_gen == 0)
    reference = solve_reference(FimiProblem.build(scenario, allow_synthetic=False), starts=6)
    assert plan.energy_j <= reference.energy * 1.005


@pytest.mark.parametrize("t_max", [60.0, 20.0])
def test_kkt_conditions_hold_at_the_returned_plan(t_max):
    scenario = tightened(fimi_scenario(12, 5), t_max)
    sy, dv = scenario.system, scenario.devices
    plan = solve_plan(scenario, "fimi")
    problem = FimiProblem.build(scenario)
    cmp_ = solve_compute(problem, plan.t_cmp)
    com = solve_uplink(problem, plan.t_com)
    nu, varpi = cmp_.nu[0], com.varpi[0]
    assert nu > 0, "the error budget should bind in this scenario"

    # P6 stationarity (26c, gamma kept): marginal compute saving of lower error equals nu where free
    rho = dv.eps * (sy.tau * sy.omega) ** 3 * sy.alpha ** (3 / sy.beta) / plan.t_cmp ** 2
    delta = cmp_.delta[0]
    marginal = 3 * rho / sy.beta * (delta + sy.gamma) ** (-(sy.beta + 3) / sy.beta)
    at_lo, at_hi = np.isclose(delta, cmp_.delta_lo[0], rtol=1e-9), np.isclose(delta, cmp_.delta_hi[0], rtol=1e-9)
    free = ~at_lo & ~at_hi
    assert free.any()
    assert np.allclose(marginal[free], nu, rtol=1e-6)
    assert np.all(marginal[at_lo] <= nu * (1 + 1e-6)) and np.all(marginal[at_hi] >= nu * (1 - 1e-6))
    assert delta.sum() == pytest.approx(problem.error_budget, rel=1e-9)

    # P7 stationarity: -Q(b) ([FIMI eq. 34]) equals varpi where b > b_min, is at most varpi at b_min
    x = problem.s_bits / (plan.b * plan.t_com)
    price = sy.noise_w_per_hz * plan.t_com / dv.gain * (2 ** x * (x * LN2 - 1) + 1)
    at_min = np.isclose(plan.b, com.b_min[0], rtol=1e-9)
    assert np.allclose(price[~at_min], varpi, rtol=1e-6)
    assert np.all(price[at_min] <= varpi * (1 + 1e-6))
    assert plan.b.sum() == pytest.approx(sy.bandwidth_hz, rel=1e-9)

    # P5: no single device's time split can move and lower the round energy
    eta_min, eta_max = problem.eta_bounds()
    h = 1e-4
    moves = []
    for k in range(len(dv)):
        for step in (-h, h):
            eta = plan.eta.copy()
            eta[k] = np.clip(eta[k] + step, eta_min[k], eta_max[k])
            moves.append(eta)
    assert round_energy(problem, np.array(moves)).min() >= plan.energy_j * (1 - 1e-9)


def test_binding_constraints_are_reported_when_they_bind():
    scenario = tightened(fimi_scenario(10, 3), 20.0)  # a tight budget pushes CPUs and radios to their limits
    plan = solve_plan(scenario, "fimi")
    tags = [t for row in plan.binding for t in row]
    assert any("CPU at f_max" in t for t in tags) or any("power at P_max" in t for t in tags)
    for k, row in enumerate(plan.binding):
        assert ("CPU at f_max" in row) == bool(plan.f[k] >= scenario.devices.f_max[k] * (1 - 1e-6))
