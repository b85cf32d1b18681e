"""Priced offloading of sampler steps in a federated run ([GenMEN]'s game on fedfill's
generator, design note III.2): the figures a device and the server share, numpy only, so a
device imports it the way it imports `augmentation`.

Units. A step-image is one sampler step of one image (2 UNet passes with guidance). A device
that needs m_n images this round plays the integer game of `stackelberg` with one unit = one
sampler step of all m_n images: weight w_n = m_n step-images, units S (the generator's
steps), unit_cost m_n (capacity spent per unit, in step-images) and no fixed cost (the
classifier job loads no UNet of its own to train). Its capacity C_n is the step-images its
f_max buys in the run's budget seconds (public: it goes in the profile). The server's price p
is per step-image, so the device earns p * k_n * m_n for taking the last k_n steps of each
image. Its preference theta_n is private: a node-config key, or in simulation the draw
`simulated_theta`.
"""

from __future__ import annotations

import numpy as np

from .stackelberg import PricingGame, follower_response, solve_price

PASSES_PER_STEP = 2  # a guided sampler step: the conditional and the unconditional UNet pass
ENTRY_RANGE = (0.02, 0.6)  # a simulated device's entry price, as a fraction of the server's cost


def step_capacity(f_max_hz: float, budget_s: float, cycles_per_pass: float) -> float:
    """C_n: the step-images a device's f_max runs in `budget_s` seconds, by the cost model's
    cycles of one UNet pass of one image."""
    return float(f_max_hz) * float(budget_s) / (PASSES_PER_STEP * float(cycles_per_pass))


def simulated_theta(seed: int, partition_id: int, capacity: float, server_cost: float) -> float:
    """A simulated device's private theta: theta = e (1 + C) kappa with its entry fraction e
    drawn uniform in ENTRY_RANGE from the run's seed and its partition. Why this range: a
    device's first step pays it from p = (theta / m) ln((1 + C) / (1 + C - m)) ~ theta / (1 + C)
    = e kappa (for m << C), so every device's entry price lies inside (0, kappa), where the
    server gains by buying: no device is out of the game from the start, none joins at any
    price (the learned pricers' GameDraw uses the same range). The same on every process."""
    rng = np.random.default_rng([int(seed), int(partition_id), 0x7072])  # "pr": a stream of its own
    entry = rng.uniform(*ENTRY_RANGE)
    return float(entry * (1.0 + capacity) * server_cost)


def device_game(theta, capacity, images, steps: int, server_cost: float = 0.0, revenue: float = 0.0) -> PricingGame:
    """The integer game of devices with these figures (one each; every device with images > 0)."""
    images = np.atleast_1d(np.asarray(images, dtype=float))
    n = len(images)
    return PricingGame(theta=np.broadcast_to(np.asarray(theta, dtype=float), (n,)).copy(),
                       capacity=np.broadcast_to(np.asarray(capacity, dtype=float), (n,)).copy(),
                       unit_cost=images, fixed_cost=np.zeros(n), units=np.full(n, float(steps)),
                       server_cost=float(server_cost), revenue=float(revenue), integer=True, weight=images)


def best_response(price: float, theta: float, capacity: float, images: int, steps: int) -> int:
    """k_n: the sampler steps of each of its `images` a device runs itself at `price` per
    step-image, its integer best response (0 when it has nothing to generate or no price)."""
    if images <= 0 or price <= 0:
        return 0
    return int(follower_response(device_game(theta, capacity, images, steps), price)[0])


def realised_utility(price: float, local_steps, images, steps: int, server_cost: float, revenue: float) -> float:
    """U_s of a round as played: R - sum_n m_n [p k_n + kappa (S - k_n)]."""
    k, m = np.asarray(local_steps, dtype=float), np.asarray(images, dtype=float)
    return float(revenue - np.sum(m * (price * k + server_cost * (steps - k))))


def oracle(thetas, capacities, images, steps: int, server_cost: float, revenue: float):
    """The exact solver's price and U_s on a round's public game with every theta (reporting
    only, or `--pricing exact`, which is defined as this oracle); devices with no images sit
    out; (0, R) when none has any."""
    images = np.asarray(images, dtype=float)
    playing = images > 0
    if not playing.any():
        return 0.0, float(revenue)
    game = device_game(np.asarray(thetas, dtype=float)[playing], np.asarray(capacities, dtype=float)[playing],
                       images[playing], steps, server_cost, revenue)
    solution = solve_price(game)
    return solution.price, solution.leader_utility
