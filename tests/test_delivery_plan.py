"""The delivery planner [MEG]: each device's mode, hand-off and bits, exact against brute force."""

import itertools
import math

import numpy as np
import pytest

from strategies.allocation.delivery import DeliveryProblem, option_costs, options_of, solve_delivery


def problem(**changes) -> DeliveryProblem:
    rng = np.random.default_rng(changes.pop("seed", 0))
    n = changes.pop("n", 4)
    values = dict(images=rng.integers(20, 120, n), eps=rng.uniform(4e-27, 6e-27, n), f_max=rng.uniform(1e9, 2e9, n),
                  downlink_bps=rng.uniform(1e6, 2e7, n), steps=20, image_bytes=64, cycles_per_pass=8.8e4,
                  t_fill_s=10.0, holds_generator=rng.random(n) < 0.5, generator_bytes=4.0e6, downlink_weight=1e-4,
                  handoffs=(5, 10, 15), state_bits=(2, 4, 8), sketch_factors=(2, 4))
    values.update(changes)
    return DeliveryProblem(**values)


def brute_force(p: DeliveryProblem) -> float:
    cost, _, _, server = option_costs(p, options_of(p))
    best = math.inf
    for combo in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if server[rows, combo].sum() <= p.server_capacity:
            best = min(best, cost[rows, combo].sum())
    return best


def test_without_a_server_limit_each_device_takes_its_cheapest_option():
    p = problem(n=6)
    plan = solve_delivery(p)
    cost, *_ = option_costs(p, options_of(p))
    assert plan.feasible and plan.objective == pytest.approx(cost.min(axis=1).sum(), rel=1e-12)
    assert plan.lower_bound == plan.objective


@pytest.mark.parametrize("seed", range(5))
def test_a_binding_server_limit_is_solved_exactly(seed):
    p = problem(n=3, seed=seed, handoffs=(10,), state_bits=(4,), sketch_factors=(2,))
    free = solve_delivery(p)
    limited = problem(n=3, seed=seed, handoffs=(10,), state_bits=(4,), sketch_factors=(2,),
                      server_capacity=0.5 * free.server_passes.sum())
    plan = solve_delivery(limited)
    assert plan.feasible and plan.server_passes.sum() <= limited.server_capacity
    assert plan.objective == pytest.approx(brute_force(limited), rel=1e-9)
    assert plan.lower_bound <= plan.objective * (1 + 1e-12)


def test_no_server_time_leaves_the_devices_generating_everything_themselves():
    plan = solve_delivery(problem(server_capacity=0.0, holds_generator=True))
    assert plan.feasible and {o.mode for o in plan.options} == {"seed"} and plan.server_passes.sum() == 0


def test_a_device_that_cannot_generate_in_time_is_named():
    plan = solve_delivery(problem(n=2, f_max=[2e9, 1.0], downlink_bps=[1e7, 1.0], t_fill_s=1.0))
    assert not plan.feasible and plan.reasons == ["device 1: no delivery fits its fill budget of 1 s"]


def test_a_server_too_small_for_any_plan_says_so():
    plan = solve_delivery(problem(n=2, f_max=1.0, server_capacity=10.0))
    assert not plan.feasible and "the service can run 10 UNet passes" in plan.reasons[0]


def test_downloading_the_generator_makes_the_split_modes_cost_their_weight():
    """A device without the generator pays its 4 MB before any split mode; at a price on
    downlink time the service's images win, and holding the generator turns that around."""
    without = solve_delivery(problem(n=1, holds_generator=False, downlink_weight=1.0))
    held = solve_delivery(problem(n=1, holds_generator=True, downlink_weight=1.0))
    assert without.options[0].mode == "image"
    assert held.options[0].mode != "image" and held.downlink_s[0] < without.downlink_s[0]


@pytest.mark.parametrize("bad, reason", [({"images": [-1]}, "images"), ({"f_max": [0.0]}, "positive"),
                                          ({"steps": 1}, "cannot be split"), ({"t_fill_s": 0.0}, "t_fill_s"),
                                          ({"handoffs": (0,)}, "hand-off steps")])
def test_bad_input_is_refused_with_the_reason(bad, reason):
    values = dict(images=[10], eps=[5e-27], f_max=[1e9], downlink_bps=[1e6], steps=20, image_bytes=64,
                  cycles_per_pass=1e5, t_fill_s=10.0)
    with pytest.raises(ValueError, match=reason):
        DeliveryProblem(**{**values, **bad})
