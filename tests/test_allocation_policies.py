"""The papers' monotone effects, the policies' promises, and infeasibility as an answer."""

import numpy as np
import pytest

from strategies.allocation import solve_plan
from strategies.allocation.augmentation import augmentation_policy
from strategies.allocation.policies import POLICIES, POLICY_FORMS, parse_policy
from strategies.allocation.presets import fimi_path_gain, fimi_scenario, ondemand_scenario
from strategies.allocation.quantization import (bits_for_error, codec_bits_for_error, optimal_time_split,
                                                prior_codec_constant, smallest_demand, split_bounds,
                                                theorem1_bits_for_error)
from strategies.allocation.scenario import Devices, Scenario, ScenarioError, System, parse_scenario


def with_system(scenario, **changes):
    values = {k: getattr(scenario.system, k) for k in System.__dataclass_fields__}
    values.update(changes)
    return Scenario(System(**values), scenario.devices)


def lined_up(n=8, eps=None, distance=None):
    """Identical devices but for an arithmetic sequence in eps or in distance ([FIMI Fig. 5b])."""
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

def test_theorem1_bits_meet_its_bound_with_no_bit_to_spare():
    demand = np.logspace(-7, -2, 200)
    bits = theorem1_bits_for_error(demand)
    assert np.array_equal(bits, bits_for_error(demand))  # the old name keeps the same rule
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


@pytest.mark.parametrize("constant", [0.5, 1.0, 4.7, 6.04, 80.0])
def test_codec_bits_are_the_fewest_that_meet_the_modeled_error(constant):
    demand = np.logspace(-19, -0.05, 3000)
    bits = codec_bits_for_error(demand, constant)
    brute = [next((b for b in range(2, 32) if constant / (2 ** (b - 1) - 1) ** 2 <= q), 32) for q in demand]
    assert bits.tolist() == brute
    assert np.all((bits == 32) == (demand < smallest_demand(constant)))


def test_codec_bits_broadcast_and_reject_meaningless_inputs():
    bits = codec_bits_for_error(np.array([[1e-3], [1e-5]]), np.array([1.0, 5.0, 20.0]))
    assert bits.shape == (2, 3) and np.all(np.diff(bits, axis=1) >= 0) and np.all(bits[1] > bits[0])
    for q, k in ((0.0, 5.0), (1e-3, 0.0), (1e-3, np.inf), (np.nan, 5.0), (1e-3, np.nan)):
        with pytest.raises(ValueError):
            codec_bits_for_error(q, k)


def test_the_prior_codec_constant_is_the_gaussian_bound():
    assert prior_codec_constant(37e6) == pytest.approx(np.log(74e6) / 3)
    assert prior_codec_constant(3_491_530) == pytest.approx(5.253, abs=1e-3)
    assert prior_codec_constant(1e3) < prior_codec_constant(1e6)
    # a single Gaussian tensor of M values has K ~= n max|u|^2 / (6 ||u||^2) below the prior
    u = np.random.default_rng(0).standard_normal(1_000_000)
    assert u.size * np.abs(u).max() ** 2 / (6 * np.sum(u ** 2)) < prior_codec_constant(u.size)
    for bad in (0, 0.5, np.inf, np.nan):
        with pytest.raises(ValueError, match="model_params"):
            prior_codec_constant(bad)


def test_codec_rule_asks_more_bits_than_theorem1_and_uses_the_reported_constant():
    scenario = ondemand_scenario(8, 2)
    codec_plan = solve_plan(scenario, "ondemand")
    theorem1 = solve_plan(scenario, "ondemand", bits_rule="theorem1")
    assert np.all(codec_plan.bits >= theorem1.bits + 1) and codec_plan.energy_j > theorem1.energy_j
    expected = codec_bits_for_error(scenario.devices.quant_error, prior_codec_constant(scenario.system.model_params))
    assert np.array_equal(codec_plan.bits, expected)
    # a device that measured an easy update (small K) is planned fewer bits, the others keep the prior
    reported = np.full(8, np.nan)
    reported[3] = 0.2
    informed = Scenario(scenario.system, Devices(**{**{k: getattr(scenario.devices, k) for k in Devices.__dataclass_fields__},
                                                   "codec_constant": reported}))
    plan = solve_plan(informed, "fimi+ondemand")
    assert plan.bits[3] == codec_bits_for_error(scenario.devices.quant_error[3], 0.2) < codec_plan.bits[3]
    assert np.array_equal(np.delete(plan.bits, 3), np.delete(codec_plan.bits, 3))
    with pytest.raises(ValueError, match="bits rule"):
        solve_plan(scenario, "ondemand", bits_rule="paper")


@pytest.mark.parametrize("policy", ["ondemand", "fimi+ondemand"])
@pytest.mark.parametrize("rule", ["codec", "theorem1"])
def test_a_demand_no_width_can_meet_is_an_infeasible_plan_naming_the_device(policy, rule):
    scenario = ondemand_scenario(4, 0)
    demand = scenario.devices.quant_error.copy()
    demand[2] = 1e-20
    devices = Devices(**{**{k: getattr(scenario.devices, k) for k in Devices.__dataclass_fields__}, "quant_error": demand})
    plan = solve_plan(Scenario(scenario.system, devices), policy, bits_rule=rule)
    assert not plan.feasible and plan.policy == policy
    (reason,) = plan.reasons
    assert reason["constraint"] == "quantization_error" and reason["devices"] == ["dev0002"]
    floor = smallest_demand(prior_codec_constant(scenario.system.model_params), rule)
    assert reason["smallest_demand"] == pytest.approx(float(floor)) and f"{float(floor):.4g}" in reason["message"]
    assert "dev0002" in reason["message"] and plan.to_json()["reasons"] == plan.reasons


def test_parse_policy_accepts_the_base_policies_fp32_and_fixed_widths():
    assert [parse_policy(p) for p in POLICIES] == [(p, None) for p in POLICIES]
    assert parse_policy("fp32") == ("fixed", 32)
    assert [parse_policy(f"fixed-{n}") for n in range(2, 33)] == [("fixed", n) for n in range(2, 33)]
    for bad in ("fixed-1", "fixed-33", "fixed-06", "fixed-", "fixed-8.0", "fixed-٨", "FP32", "fp16", "magic", "", None, 8):
        with pytest.raises(ValueError, match="fixed-N") as err:
            parse_policy(bad)
        assert repr(bad) in str(err.value)
    assert "fp32" in POLICY_FORMS and all(p in POLICY_FORMS for p in POLICIES)


def test_fixed_width_policies_override_every_devices_bits_and_keep_their_name():
    scenario = ondemand_scenario(5, 3)
    plan = solve_plan(scenario, "fixed-7")
    same = solve_plan(Scenario(scenario.system, scenario.devices.with_bits(7)), "fixed")
    assert plan.policy == "fixed-7" and plan.to_json()["policy"] == "fixed-7" and np.all(plan.bits == 7)
    assert plan.energy_j == same.energy_j and np.allclose(plan.eta, 0.5)
    fp32 = solve_plan(with_system(fimi_scenario(4, 0), t_max_s=60.0), "fp32")
    assert fp32.policy == "fp32" and fp32.feasible and np.all(fp32.bits == 32)
    with pytest.raises(ValueError, match="unknown policy 'fixed-40'"):
        solve_plan(scenario, "fixed-40")


def with_device_field(name, value, k=1):
    data = ondemand_scenario(3, 0).to_json()
    data["devices"][k][name] = value
    return data


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 1.5, -1e-3, float("nan"), float("inf"), "1e-3", True])
def test_a_demand_outside_zero_one_names_the_device_and_field(value):
    with pytest.raises(ScenarioError, match="device 'dev0001': field 'quant_error'"):
        parse_scenario(with_device_field("quant_error", value))


@pytest.mark.parametrize("value", [0, -2.0, float("nan"), float("inf"), "5", False, [1.0]])
def test_a_codec_constant_must_be_finite_and_positive(value):
    with pytest.raises(ScenarioError, match="device 'dev0001': field 'codec_constant'"):
        parse_scenario(with_device_field("codec_constant", value))


def test_the_codec_constant_travels_through_the_scenario_json():
    scenario = parse_scenario(with_device_field("codec_constant", 7.25, k=2))
    assert np.isnan(scenario.devices.codec_constant[[0, 1]]).all() and scenario.devices.codec_constant[2] == 7.25
    data = scenario.to_json()
    assert "codec_constant" not in data["devices"][0] and data["devices"][2]["codec_constant"] == 7.25
    assert parse_scenario(data).to_json() == data
    assert scenario.subset([2]).devices.codec_constant.tolist() == [7.25]
    assert scenario.devices.with_bits(6).codec_constant[2] == 7.25


def test_devices_built_in_code_obey_the_same_rules():
    dv = ondemand_scenario(2, 0).devices
    fields = {k: getattr(dv, k) for k in Devices.__dataclass_fields__}
    with pytest.raises(ScenarioError, match="device 'dev0000': field 'quant_error' must be in"):
        Devices(**{**fields, "quant_error": np.array([1.0, 1e-3])})
    with pytest.raises(ScenarioError, match="device 'dev0001': field 'codec_constant'"):
        Devices(**{**fields, "codec_constant": np.array([np.nan, -1.0])})
    assert np.isnan(Devices(**{**fields, "codec_constant": None}).codec_constant).all()


def test_the_ondemand_presets_demands_are_the_papers_6_to_8_bits_and_our_codec_asks_more():
    scenario = ondemand_scenario(300, 5)
    assert set(solve_plan(scenario, "ondemand", bits_rule="theorem1").bits.tolist()) == {6, 7, 8}
    codec = solve_plan(scenario, "ondemand").bits
    assert np.all(codec >= solve_plan(scenario, "ondemand", bits_rule="theorem1").bits + 1) and codec.max() <= 10


def test_ondemand_beats_fixed_bits_with_an_even_split():
    scenario = ondemand_scenario(10, 1)
    ondemand = solve_plan(scenario, "ondemand")
    fixed = solve_plan(Scenario(scenario.system, scenario.devices.with_bits(ondemand.bits)), "fixed")
    assert fixed.feasible and np.array_equal(fixed.bits, ondemand.bits)
    assert ondemand.energy_j < fixed.energy_j  # the same bits, the optimal time split


# ---------------------------------------------------------------- augmentation policy ([FIMI eq. 47])

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
