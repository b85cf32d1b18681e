"""The server's side of priced offloading in a federated run ([GenMEN]'s game, design note
III.2.2): a price per step-image every round, from the history of prices and responses, and
the round settled from the replies.

What the server knows: each device's public capacity (its profile's gen_capacity), the images
it planned it (d_gen) and, after a round, each device's images m_n and steps k_n (its reply).
Never a device's theta. The one exception is the oracle: the exact solver with every theta,
which the report sets beside the realised utility (`--pricing exact` is defined as that
oracle, a yardstick, not a deployable leader). In simulation the server recomputes the same
thetas the devices draw (strategies.allocation.offloading.simulated_theta); a node with its
own `gen-theta` in its node config is unknown to it, and the oracle then is not one.

Flower-free; torch only through a learned pricer (strategies.learned), loaded by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO

import numpy as np
from flwr.common import log

from fedfill import contract
from strategies.allocation.offloading import device_game, oracle, realised_utility

OPENING_FRACTION = 0.5  # a learned pricer's first price (of kappa): it needs a price and its responses to act on


class RoundPricing:
    """`kind` is RunConfig.pricing's (parse_pricing): fixed (at `fixed_price`), exact (the
    oracle on the round's predicted game), or a learned pricer (`pricer`, strategies.learned's
    Pricer: gdm, ppo, random), which plays the devices in `profiles` order of partition.
    `thetas` (node -> theta) only for the oracle: exact's price and the report's
    leader_utility_oracle; None where unknown."""

    def __init__(self, kind: str, *, profiles: Mapping[int, dict], steps: int, server_cost: float, revenue: float,
                 refresh: float, fixed_price: float = 0.0, thetas: Mapping[int, float] | None = None, pricer=None,
                 seed: int = 0) -> None:
        self.kind, self.fixed_price, self.pricer, self.thetas = kind, fixed_price, pricer, thetas
        self.steps, self.server_cost, self.revenue, self.refresh = steps, server_cost, revenue, refresh
        self.capacity = {n: float(p[contract.CAPACITY_FIELD]) for n, p in profiles.items()}
        partition = {n: p.get(contract.PARTITION_FIELD) for n, p in profiles.items()}
        self.order = sorted(profiles, key=lambda n: (partition[n] is None, partition[n] or 0, n))
        self.rng = np.random.default_rng([int(seed), 0x7072])
        self.used: dict[int, int] = {}  # node -> synthetic samples it trained on last time: what it holds
        self.images: dict[int, int] = {}  # node -> the images it generated in its last fill (m_n)
        self.history: tuple[float, dict[int, int], dict[int, int]] | None = None  # last price, m_n, k_n
        self.price = 0.0

    def predicted_images(self, node: int, d_gen: int) -> int:
        """m_n the device will generate for a plan of d_gen samples: all of them the first time;
        later its shortfall against what it held and the refreshed share of what it reuses (the
        device's rule, exact when its request's classes stay the same)."""
        if node not in self.used:
            return int(d_gen)
        reused = min(int(d_gen), self.used[node])
        return int(d_gen) - reused + int(round(self.refresh * reused))

    def price_round(self, server_round: int, planned: Mapping[int, int]) -> float:
        """p_t for the planned nodes (node -> d_gen), from the history."""
        if self.kind == "fixed":
            price = self.fixed_price
        elif self.kind == "exact":
            nodes = list(planned)
            price = oracle([self.thetas[n] for n in nodes], [self.capacity[n] for n in nodes],
                           [self.predicted_images(n, planned[n]) for n in nodes], self.steps, self.server_cost,
                           self.revenue)[0]
        elif self.history is None:
            price = OPENING_FRACTION * self.server_cost
        else:
            last_price, images, local = self.history
            # the last round's public game; a device that generated nothing plays with what it
            # is planned now (a weight must be positive), its response 0
            weights = [max(images.get(n) or self.predicted_images(n, planned.get(n, 0)), 1) for n in self.order]
            game = device_game(np.ones(len(self.order)), [self.capacity[n] for n in self.order], weights, self.steps,
                               self.server_cost, self.revenue)
            price = float(self.pricer.next_price(game, last_price, np.array([local.get(n, 0) for n in self.order],
                                                                              dtype=float), self.rng))
        self.price = float(price)
        log(INFO, "round %d: price %.6g per step-image (%s)", server_round, self.price, self.kind)
        return self.price

    def settle(self, used: Mapping[int, Mapping]) -> dict:
        """The round's figures from the used replies' metrics (node -> MetricRecord): the price,
        step-images run by the service and by the devices, payments, the realised leader utility
        and, where the thetas are known, the oracle's (every figure in step-images and the
        price's money)."""
        images = {n: int(m["gen-images"]) for n, m in used.items()}
        local = {n: min(int(m["gen-local-steps"]), self.steps) for n, m in used.items()}
        for n, m in used.items():
            self.used[n] = int(m["d-gen-used"])
        nodes = [n for n in used if images[n] > 0]
        k = np.array([local[n] for n in nodes], dtype=float)
        m = np.array([images[n] for n in nodes], dtype=float)
        figures = {"gen-price": self.price, "gen-server-steps": int(np.sum(m * (self.steps - k))),
                   "gen-device-steps": int(np.sum(m * k)), "gen-payments": float(self.price * np.sum(m * k)),
                   "leader-utility": realised_utility(self.price, k, m, self.steps, self.server_cost, self.revenue)}
        if self.thetas is not None and all(n in self.thetas for n in nodes):
            figures["leader-utility-oracle"] = oracle([self.thetas[n] for n in nodes],
                                                      [self.capacity[n] for n in nodes], m, self.steps,
                                                      self.server_cost, self.revenue)[1]
        self.history = (self.price, images, local)
        return figures
