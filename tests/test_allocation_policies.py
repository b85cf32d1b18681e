"""The papers' monotone effects, the policies' promises, and infeasibility as an answer."""

import numpy as np
import pytest

from strategies.allocation import solve_plan
from strategies.allocation.augmentation import augmentation_policy
from strategies.allocation.presets import fimi_path_gain, fimi_scenario, ondemand_scenario
from strategies.allocation.quantization import bits_for_error, optimal_time_split, split_bounds
from strategies.allocation.scenario import Devices, Scenario, System


def with_system(scenario, **changes):
    values = {k: getattr(scenario.system, k) for k in System.__dataclass_fields__}
    values.update(changes)
    return Scenario(System(**values), scenario.devices)


def lined_up(n=8, eps=None, distance=None):
    """Identical devices but for an arithmetic sequence in eps or in distance (Fig. 5b)."""
    base = fimi_scenario(n, 0)
    dv = base.devices
    eps = np.full(n, 5e-27) if eps is None else eps
    distance = np.full(n, 200.0) if distance is None else distance
    devices = Devices(ids=dv.ids, d_loc=dv.d_loc, f_max=np.full(n, 1.5e9), eps=eps, p_max=np.full(n, 0.15),
                      gain=fimi_path_gain(distance), bits=dv.bits, quant_error=dv.quant_error, class_counts=None)
    return Scenario(base.system, devices)


def test_cheaper_compute_gets_more_synthetic_data():
    plan = solve_plan(lined_up(eps=np.linspace(4e-27, 6e-27, 8)), "fimi")
    assert np.all(np.diff(plan.d_gen) < 0)


def test_closer_devices_get_more_synthetic_data():
    plan = solve_plan(lined_up(distance=np.linspace(50.0, 390.0, 8)), "fimi")
    assert np.all(np.diff(plan.d_gen) < 0)


def test_a_tighter_latency_budget_costs_more_energy():
    scenario = fimi_scenario(10, 2)
    energies = [solve_plan(with_system(scenario, t_max_s=t), "fimi").energy_j for t in (60.0, 40.0, 30.0, 22.0)]
    assert all(np.isfinite(energies))
    assert np.all(np.diff(energies) > 0)


def test_quantizing_on_demand_never_costs_more_than_fimi_at_32_bits():
    base = fimi_scenario(12, 4)
    rng = np.random.default_rng(1)
    dv = base.devices
    demands = Devices(**{**{k: getattr(dv, k) for k in Devices.__dataclass_fields__},
                         "quant_error": rng.uniform(1e-5, 1e-3, len(dv))})
    for t_max in (60.0, 25.0):
        scenario = with_system(Scenario(base.system, demands), t_max_s=t_max)
        joint, plain = solve_plan(scenario, "fimi+ondemand"), solve_plan(scenario, "fimi")
        assert np.all(plain.bits == 32) and np.all(joint.bits < 32)
        assert joint.energy_j <= plain.energy_j


def test_tfl_spends_no_synthetic_data_and_less_energy_than_fimi():
    scenario = fimi_scenario(10, 3)
    tfl, fimi = solve_plan(scenario, "tfl"), solve_plan(scenario, "fimi")
    assert np.all(tfl.d_gen == 0) and fimi.d_gen.sum() > 0
    assert tfl.energy_j < fimi.energy_j  # FIMI buys its lower error with compute


def test_hdc_puts_fimis_amount_on_the_least_populated_class():
    scenario = fimi_scenario(6, 5)
    hdc, fimi = solve_plan(scenario, "hdc"), solve_plan(scenario, "fimi")
    assert np.allclose(hdc.d_gen, fimi.d_gen)
    for counts, gen, amount in zip(scenario.devices.class_counts, hdc.class_gen, hdc.d_gen):
        assert gen.sum() == round(amount) and gen[np.argmin(counts)] == gen.sum()


def test_the_same_seed_gives_the_same_plan_for_both_searches():
    scenario = fimi_scenario(8, 6)
    for search in ("lagrangian", "ce"):
        a, b = solve_plan(scenario, "fimi", seed=3, search=search), solve_plan(scenario, "fimi", seed=3, search=search)
        assert a.to_json()["devices"] == b.to_json()["devices"]


def test_cross_entropy_search_converges_towards_the_optimum():
    scenario = fimi_scenario(5, 1)
    ce, exact = solve_plan(scenario, "fimi", search="ce"), solve_plan(scenario, "fimi")
    best = np.array(ce.trace.best_energy)
    assert np.all(np.diff(best) <= 0) and best[-1] < best[0]
    assert ce.trace.max_sigma[-1] < 0.01 * ce.trace.max_sigma[0]
    assert exact.energy_j <= ce.energy_j <= exact.energy_j * 1.01


# ---------------------------------------------------------------- on-demand quantization

def test_bits_meet_the_error_demand_with_no_bit_to_spare():
    demand = np.logspace(-7, -2, 200)
    bits = bits_for_error(demand)
    levels = 2.0 ** (bits - 1)  # one sign bit, the rest index the levels
    assert np.all(1.0 / (2 * levels ** 2) <= demand)
    fewer = 2.0 ** (bits - 2)
    assert np.all((1.0 / (2 * fewer ** 2) > demand) | (bits == 2))


def test_ondemand_time_split_minimises_each_devices_energy():
    scenario = ondemand_scenario(6, 0)
    plan = solve_plan(scenario, "ondemand")
    sy, dv = scenario.system, scenario.devices
    work = sy.tau * sy.omega * dv.d_loc
    s_bits = sy.model_params * plan.bits
    theta_min, pi_min = split_bounds(work, dv.f_max, s_bits, plan.b, dv.gain, dv.p_max, sy.noise_w_per_hz, sy.t_max_s)
    grid = theta_min + np.linspace(0, 1, 20001)[:, None] * (1 - pi_min - theta_min)
    pi = 1 - grid
    energy = (dv.eps * work ** 3 / (grid * sy.t_max_s) ** 2
              + pi * sy.t_max_s * plan.b * sy.noise_w_per_hz / dv.gain * np.expm1(np.log(2) * s_bits / (plan.b * pi * sy.t_max_s)))
    assert np.all(plan.e_cmp + plan.e_com <= energy.min(0) * (1 + 1e-9))
    theta = optimal_time_split(dv.eps, work, s_bits, plan.b, dv.gain, sy.noise_w_per_hz, sy.t_max_s, theta_min, pi_min)
    assert np.allclose(theta, plan.eta)


def test_ondemand_beats_fixed_bits_with_an_even_split():
    scenario = ondemand_scenario(10, 1)
    ondemand = solve_plan(scenario, "ondemand")
    fixed = solve_plan(Scenario(scenario.system, scenario.devices.with_bits(8)), "fixed")
    assert fixed.feasible and np.all(ondemand.bits <= 8)
    assert ondemand.energy_j < fixed.energy_j


# ---------------------------------------------------------------- augmentation policy (eq. 47)

def entropy(counts):
    p = counts / counts.sum()
    p = p[p > 0]
    return -(p * np.log(p)).sum()


@pytest.mark.parametrize("seed", range(5))
def test_augmentation_fills_the_emptiest_classes_as_greedily_as_possible(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 200, 10)
    amount = int(rng.integers(1, 600))
    gen = augmentation_policy(counts, amount)
    greedy = np.zeros(10, dtype=int)
    for _ in range(amount):  # one sample at a time to the emptiest class: optimal for entropy
        greedy[np.argmin(counts + greedy)] += 1
    assert gen.sum() == amount and np.all(gen >= 0)
    assert np.array_equal(np.sort(counts + gen), np.sort(counts + greedy))
    other = gen.copy()
    other[np.argmax(gen)] -= 1
    other[np.argmax(counts + gen)] += 1
    assert entropy(counts + gen) >= entropy(counts + other)


def test_augmentation_of_nothing_is_nothing():
    assert augmentation_policy([5, 0, 3], 0).tolist() == [0, 0, 0]


# ---------------------------------------------------------------- infeasible is an answer

def test_an_impossible_latency_budget_names_the_devices():
    plan = solve_plan(with_system(fimi_scenario(5, 0), t_max_s=0.5), "fimi")
    assert not plan.feasible
    assert plan.reasons[0]["constraint"] == "latency" and plan.reasons[0]["devices"]
    assert plan.to_json()["feasible"] is False


def test_a_too_narrow_band_is_reported_as_bandwidth():
    plan = solve_plan(with_system(fimi_scenario(10, 0), bandwidth_hz=3e6, t_max_s=30.0), "fimi")
    assert not plan.feasible and plan.reasons[0]["constraint"] == "bandwidth"


def test_an_unreachable_error_target_is_reported_as_learning_error():
    plan = solve_plan(with_system(fimi_scenario(5, 0), zeta=150.0, d_gen_max=100.0), "fimi")
    assert not plan.feasible and plan.reasons[0]["constraint"] == "learning_error"
    assert "d_gen_max" in plan.reasons[0]["message"]
