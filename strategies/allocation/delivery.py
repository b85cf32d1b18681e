"""Which delivery mode each device gets its synthetic samples in [MEG], planned for the round.

For device n, generating m_n images with a sampler of S steps, each option o is one of
- image: the service runs all S steps and sends the images;
- state (k, q): the service runs the first k steps, sends the state at q bits, the device the rest;
- sketch (k, r): the service runs all S steps and sends images downsampled r times per side,
  the device re-noises them to step k and runs the rest;
- seed: the device runs all S steps.

An option costs the device E = eps * C * f^2 for the C cycles of its UNet passes (the cost
model of its training, [FIMI eqs. 5-6]) at the lowest frequency that finishes the fill within
its budget T_fill: the download of D bytes at the device's downlink rate R takes D/R, the
passes C/f, and C/f + D/R <= T_fill (f <= f_max; an option that cannot fit is out). The
objective adds the downlink time at a price of `downlink_weight` joules per second:

    minimise  sum_n E_n(o_n) + w * D_n(o_n) / R_n
    subject to sum_n server_passes(o_n) <= server_capacity.

Without the capacity each device's choice is its own (exact by enumeration). With it the
problem is a multiple-choice knapsack: exact by dynamic programming over the capacity in
units of one image's UNet pass (`solve_delivery`), with the Lagrangian bound beside it (the
costs are not convex in k, so one multiplier gives a bound, not the answer).

numpy only, like every solver here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODES = ("image", "state", "sketch", "seed")
REQUEST_BYTES = 40  # a request of ten classes' counts, a seed and the hand-off's fields
MAX_CELLS = 20_000_000  # devices x capacity units the knapsack's table may hold


@dataclass(frozen=True)
class DeliveryProblem:
    images: np.ndarray  # m_n, images each device generates this round
    eps: np.ndarray  # the devices' energy coefficients
    f_max: np.ndarray  # Hz
    downlink_bps: np.ndarray  # each device's downlink rate
    steps: int  # S, the sampler's steps
    image_bytes: int  # H * W * C of one image
    cycles_per_pass: float  # the cost model's cycles of one UNet pass of one image
    t_fill_s: float  # each device's budget for its fill: passes and download
    holds_generator: np.ndarray | None = None  # bool per device: no download for state, sketch, seed
    generator_bytes: float = 0.0  # what a device without the generator downloads first
    server_capacity: float = math.inf  # UNet passes the service can run this round, all devices together
    downlink_weight: float = 0.0  # joules per second of downlink in the objective
    state_bits: tuple[int, ...] = (4, 8)  # widths a state may be sent at
    sketch_factors: tuple[int, ...] = (2,)  # factors dividing the image side
    handoffs: tuple[int, ...] | None = None  # steps k a device may take over at; None: 1..S-1
    batch: int = 256  # images per streamed batch (one codec header of 52 bytes each)

    def __post_init__(self):
        n = len(np.atleast_1d(self.images))
        for name in ("images", "eps", "f_max", "downlink_bps"):
            value = np.broadcast_to(np.asarray(getattr(self, name), dtype=float), (n,))
            if not np.all(np.isfinite(value)) or np.any(value < 0):
                raise ValueError(f"{name} must be finite and non-negative")
            object.__setattr__(self, name, value)
        if np.any(self.f_max <= 0) or np.any(self.downlink_bps <= 0):
            raise ValueError("f_max and downlink_bps must be positive")
        if self.steps < 2:
            raise ValueError(f"a sampler of {self.steps} steps cannot be split")
        if not self.t_fill_s > 0:
            raise ValueError(f"t_fill_s must be positive, got {self.t_fill_s}")
        holds = np.zeros(n, bool) if self.holds_generator is None else np.broadcast_to(
            np.asarray(self.holds_generator, bool), (n,))
        object.__setattr__(self, "holds_generator", holds)
        handoffs = tuple(range(1, self.steps)) if self.handoffs is None else tuple(self.handoffs)
        if any(not 1 <= k <= self.steps - 1 for k in handoffs):
            raise ValueError(f"hand-off steps must be in 1..{self.steps - 1}")
        object.__setattr__(self, "handoffs", handoffs)


@dataclass(frozen=True)
class Option:
    mode: str
    handoff: int = 0  # k: the step the device takes over at (state, sketch)
    bits: int = 0  # state
    factor: int = 0  # sketch

    def passes(self, steps: int) -> tuple[int, int]:
        """(server, device) sampler steps per image; 2 UNet passes each (guidance)."""
        return {"image": (steps, 0), "state": (self.handoff, steps - self.handoff),
                "sketch": (steps, steps - self.handoff), "seed": (0, steps)}[self.mode]

    def content_bytes(self, images: int, image_bytes: int, batch: int) -> float:
        if self.mode == "image":
            return images * image_bytes
        if self.mode == "sketch":
            return images * image_bytes / self.factor ** 2
        if self.mode == "state":
            batches = math.ceil(images / batch)
            return math.ceil(images * image_bytes * self.bits / 8) + 52 * batches if images else 0.0
        return 0.0


@dataclass
class DeliveryPlan:
    options: list[Option]  # per device
    energy_j: np.ndarray  # the device's modeled energy for its fill
    downlink_s: np.ndarray
    server_passes: np.ndarray
    objective: float
    lower_bound: float  # the Lagrangian bound (equal to objective when the capacity does not bind)
    feasible: bool
    reasons: list[str] = field(default_factory=list)


def options_of(problem: DeliveryProblem) -> list[Option]:
    return ([Option("image")] + [Option("state", k, q) for k in problem.handoffs for q in problem.state_bits]
            + [Option("sketch", k, factor=r) for k in problem.handoffs for r in problem.sketch_factors]
            + [Option("seed")])


def option_costs(problem: DeliveryProblem, options: list[Option]) -> tuple[np.ndarray, ...]:
    """(cost, energy, downlink seconds, server passes), each [devices, options]; a cost of inf
    where the option cannot fit the device's fill budget."""
    n, p = len(problem.images), len(options)
    energy, down, server = np.zeros((n, p)), np.zeros((n, p)), np.zeros((n, p))
    for j, option in enumerate(options):
        server_steps, device_steps = option.passes(problem.steps)
        server[:, j] = 2 * server_steps * problem.images
        cycles = 2 * device_steps * problem.images * problem.cycles_per_pass
        content = np.array([option.content_bytes(int(m), problem.image_bytes, problem.batch) for m in problem.images])
        download = content + REQUEST_BYTES + np.where((device_steps > 0) & ~problem.holds_generator,
                                                      problem.generator_bytes, 0.0)
        down[:, j] = np.where(problem.images > 0, download * 8 / problem.downlink_bps, 0.0)
        left = problem.t_fill_s - down[:, j]
        with np.errstate(divide="ignore", invalid="ignore"):
            frequency = np.where(cycles > 0, cycles / np.maximum(left, 0.0), 0.0)
        fits = (left > 0) & (frequency <= problem.f_max * (1 + 1e-12))
        energy[:, j] = np.where(fits, problem.eps * cycles * frequency ** 2, np.inf)
    cost = energy + problem.downlink_weight * down
    return cost, energy, down, server


def solve_delivery(problem: DeliveryProblem) -> DeliveryPlan:
    """The exact plan: each device's cheapest option, or, where the server's capacity binds,
    the multiple-choice knapsack solved by dynamic programming over it (in units of one
    image's two guided UNet passes per step)."""
    options = options_of(problem)
    cost, energy, down, server = option_costs(problem, options)
    n = len(problem.images)
    reasons = [f"device {i}: no delivery fits its fill budget of {problem.t_fill_s:g} s" for i in range(n)
               if not np.isfinite(cost[i]).any()]
    if reasons:
        return DeliveryPlan([Option("image")] * n, np.full(n, np.nan), np.full(n, np.nan), np.zeros(n), math.inf,
                            math.inf, False, reasons)
    choice = np.argmin(cost, axis=1)
    used = server[np.arange(n), choice].sum()
    bound = float(cost[np.arange(n), choice].sum())
    if used > problem.server_capacity:
        choice, bound = _knapsack(problem, cost, server)
        if choice is None:
            least = float(np.where(np.isfinite(cost), server, np.inf).min(axis=1).sum())
            return DeliveryPlan([Option("image")] * n, np.full(n, np.nan), np.full(n, np.nan), np.zeros(n), math.inf,
                                math.inf, False, [f"the service can run {problem.server_capacity:g} UNet passes, "
                                                  f"the devices need at least {least:g}"])
    rows = np.arange(n)
    return DeliveryPlan([options[j] for j in choice], energy[rows, choice], down[rows, choice], server[rows, choice],
                        float(cost[rows, choice].sum()), bound, True)


def _knapsack(problem: DeliveryProblem, cost: np.ndarray, server: np.ndarray):
    """(choice per device, Lagrangian lower bound), or (None, inf) when no choice fits."""
    n, p = cost.shape
    # one image's guided step (2 passes): every option's server passes are whole multiples of it.
    # A capacity of more units than MAX_CELLS allows is counted in coarser units, each option's
    # passes rounded up: the plan still fits, and may cost a little more than the optimum.
    unit = 2.0 * max(1, math.ceil(problem.server_capacity / 2.0 * n / MAX_CELLS))
    capacity = int(problem.server_capacity // unit)
    weight = np.ceil(server / unit - 1e-9).astype(np.int64)
    best = np.full(capacity + 1, np.inf)  # best[c]: least cost of the devices so far using c units
    best[0] = 0.0
    picks = np.zeros((n, capacity + 1), np.int64)
    for i in range(n):
        new = np.full(capacity + 1, np.inf)
        for j in range(p):
            w = weight[i, j]
            if not np.isfinite(cost[i, j]) or w > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[w:] = best[:capacity + 1 - w] + cost[i, j]
            better = candidate < new
            new[better], picks[i, better] = candidate[better], j
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None, math.inf
    choice = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):
        choice[i] = picks[i, end]
        end -= weight[i, choice[i]]
    return choice, _lagrangian_bound(problem, cost, server)


def _lagrangian_bound(problem: DeliveryProblem, cost: np.ndarray, server: np.ndarray) -> float:
    """max over mu >= 0 of sum_n min_o (cost + mu * server) - mu * capacity: a lower bound of
    the knapsack's optimum (concave and piecewise linear in mu; its breakpoints tried)."""
    finite = np.where(np.isfinite(cost), cost, np.nan)
    # where a device's best option changes: mu = (c_b - c_a) / (s_a - s_b) for a pair that trades
    # server passes for cost
    dc = finite[:, None, :] - finite[:, :, None]  # [i, a, b] = c_b - c_a
    ds = server[:, :, None] - server[:, None, :]  # [i, a, b] = s_a - s_b
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where((ds > 0) & (dc > 0), dc / ds, np.nan)
    candidates = np.unique(np.concatenate([[0.0], slopes[np.isfinite(slopes)]]))

    def dual(mu: float) -> float:
        return float(np.nansum(np.nanmin(finite + mu * server, axis=1)) - mu * problem.server_capacity)

    return max(dual(mu) for mu in candidates)
