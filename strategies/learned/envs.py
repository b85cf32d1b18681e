"""The pricing game of [GenMEN] as a learning environment: the leader sees only what it would
see in a deployment (its last price, the devices' responses, their public figures), never a
device's theta, which is drawn afresh every episode. numpy only.

Everything is measured in units the game's scale drops out of, so one policy serves games of
any server cost or size with the same number of devices:

- q = p / server_cost, the price as a fraction of what the server's own work costs (a price
  above it never pays, so q in [0, 1]);
- per device, y = l / A (the work it took, A = (1 + capacity - fixed) / a its unclipped reach),
  c = cap / A (its cap) and s = N w A / sum(w A) (its share of the game's work).

A device's interior response l = A - theta / (w p) is y = 1 - e / q with e = theta / (w A kappa)
its private entry price: one interior response tells the leader e, a zero only that e >= q,
a device at its cap only that e <= q (1 - c). [GenMEN]'s state is the last price and the
responses alone; with `memory` the leader also keeps, per device, the bounds on e that every
response so far implies (`narrow`): where responses are mostly all or nothing, as in a
federated run whose devices need few images, one response says little and the bounds are
what a leader can know. e does not depend on the round's weight (w A = (1 + C - b) w / a),
so the bounds carry from round to round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from strategies.allocation.stackelberg import GameError, PricingGame, follower_response, leader_utility, solve_price

REWARDS = ("utility", "improvement", "improvement-vs-best")
MAX_DEVICES = 1000  # the state grows by 3 numbers a device; every episode solves its game exactly for the regret


def observe(game: PricingGame, price: float, responses: np.ndarray, bounds=None) -> np.ndarray:
    """The leader's state after one price: [q, y_1..y_N, c_1..c_N, s_1..s_N], then with
    `bounds` (lo, hi) the entry-price bounds [lo_1..lo_N, hi_1..hi_N]. Reads no theta."""
    reach = game.reach
    work = game.weight * reach
    share = len(reach) * work / work.sum()
    parts = [[price / game.server_cost if game.server_cost > 0 else 0.0], responses / reach, game.cap / reach, share]
    if bounds is not None:
        parts += [bounds[0], bounds[1]]
    return np.concatenate(parts).astype(np.float32)


def observation_size(devices: int, memory: bool = False) -> int:
    return 1 + (5 if memory else 3) * devices


def no_bounds(devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Before any response: e in [0, 1] (a device whose entry price is above the server's
    cost never takes work at a price worth paying, so 1 is as high as matters)."""
    return np.zeros(devices), np.ones(devices)


def narrow(game: PricingGame, price: float, responses: np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray]:
    """The bounds on each device's entry price e = theta / (w A kappa) after it answered
    `price` with `responses`, exactly: in whole units l taken means pi_(l-1) <= p < pi_l with
    pi_j = (theta / w) ln((A - j) / (A - j - 1)); in the continuous game l = A - theta / (w p)
    clipped to [0, cap]."""
    lo, hi = (np.array(b, dtype=float) for b in bounds)
    q = price / game.server_cost if game.server_cost > 0 else 0.0
    if q <= 0:
        return lo, hi  # at no price nobody works: nothing learned
    reach, cap, taken = game.reach, game.cap, np.asarray(responses, dtype=float)
    if game.integer:
        top = np.floor(cap)
        with np.errstate(divide="ignore", invalid="ignore"):
            upper = q / (reach * np.log((reach - taken + 1) / (reach - taken)))  # from pi_(l-1) <= p
            lower = q / (reach * np.log((reach - taken) / (reach - taken - 1)))  # from pi_l > p
        hi = np.where(taken >= 1, np.minimum(hi, upper), hi)
        lo = np.where(taken < top, np.maximum(lo, lower), lo)
    else:
        at_cap = taken >= cap * (1 - 1e-12)
        interior = (taken > 0) & ~at_cap
        exact = q * (1 - taken / reach)
        lo = np.where(taken <= 0, np.maximum(lo, q), np.where(interior, exact, lo))
        hi = np.where(at_cap, np.minimum(hi, q * (1 - cap / reach)), np.where(interior, exact, hi))
    return np.minimum(lo, 1.0), np.clip(hi, 0.0, 1.0)


def normalised_utility(game: PricingGame, price, responses=None) -> np.ndarray:
    """(U_s(p) - U_s(0)) / (server_cost * all the work): 0 when the server keeps everything,
    the share of its cost saved net of payments otherwise."""
    work = float((game.weight * game.units).sum())
    base = game.revenue - game.server_cost * work
    scale = game.server_cost * work
    return (leader_utility(game, price, responses) - base) / scale if scale > 0 else np.zeros_like(np.asarray(price))


@dataclass(frozen=True)
class GameDraw:
    """How an episode's game is drawn. With `public` (a game file's public figures) only theta
    is drawn: each device's entry price e = theta / (w A kappa) uniform in `entry`. Without it,
    the design note's reproduction table: capacity U(3, 6), theta U(0.5, 2), unit cost 0.358,
    fixed cost 0.116, 12 units, server cost 0.6, revenue 40."""
    devices: int = 5
    integer: bool = False
    entry: tuple[float, float] = (0.02, 0.6)
    public: dict | None = None  # {"capacity": [...], ...}: PricingGame.public() as lists
    # with `public`: each episode draws every device's weight (pieces of work per unit) as a whole
    # number in this range, log-uniform, its unit cost scaled alike (the cost of a piece stays): a federated
    # run's devices need a different number of images m_n every round
    weight_range: tuple[int, int] | None = None

    def __post_init__(self):
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or not 1 <= self.devices <= MAX_DEVICES:
            raise GameError(f"a learned pricer plays games of 1 to {MAX_DEVICES} devices, got {self.devices!r}")
        entry = self.entry
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
                and 0 <= entry[0] < entry[1] <= 10):
            raise GameError(f"entry must be two prices (fractions of the server's cost) 0 <= lo < hi <= 10, "
                            f"got {self.entry!r}")
        weights = self.weight_range
        if weights is not None and not (isinstance(weights, (tuple, list)) and len(weights) == 2
                                        and all(isinstance(v, int) and not isinstance(v, bool) for v in weights)
                                        and 1 <= weights[0] <= weights[1] <= 10**9):
            raise GameError(f"weight_range must be two whole numbers 1 <= lo <= hi, got {weights!r}")
        if self.public is not None:
            try:  # a public game that cannot take a theta is refused now, not at the first episode
                self.draw(np.random.default_rng(0))
            except (TypeError, ValueError, AttributeError) as err:
                raise GameError(f"public figures unusable: {str(err)[:200]}") from None

    @classmethod
    def around(cls, game: PricingGame, entry=(0.02, 0.6), weight_range: tuple[int, int] | None = None) -> GameDraw:
        public = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in game.public().items()}
        return cls(devices=len(game.theta), integer=game.integer, entry=tuple(entry), public=public,
                   weight_range=tuple(weight_range) if weight_range is not None else None)

    def draw(self, rng: np.random.Generator) -> PricingGame:
        n = self.devices
        if self.public is None:
            return PricingGame(theta=rng.uniform(0.5, 2.0, n), capacity=rng.uniform(3.0, 6.0, n),
                               unit_cost=np.full(n, 0.358), fixed_cost=np.full(n, 0.116), units=np.full(n, 12.0),
                               server_cost=0.6, revenue=40.0, integer=self.integer)
        figures = {k: (np.asarray(v, dtype=float) if isinstance(v, list) else v) for k, v in self.public.items()}
        if self.weight_range is not None:
            low, high = np.log(self.weight_range[0]), np.log(self.weight_range[1] + 1)
            weight = np.floor(np.exp(rng.uniform(low, high, n)))  # log-uniform: as many small rounds as large
            figures["unit_cost"] = figures["unit_cost"] / figures.get("weight", 1.0) * weight
            figures["weight"] = weight
        known = PricingGame(theta=np.ones(n), **figures)
        entry = rng.uniform(*self.entry, n)
        theta = np.maximum(entry * known.weight * known.reach * known.server_cost, 1e-12)
        return PricingGame(theta=theta, **figures)

    def settings(self) -> dict:
        return asdict(self)


class PricingEnv:
    """Episodes of `horizon` prices on one drawn game, `batch` episodes side by side.

    reset() draws the games and a random first price (the paper: "the initial state ... can be
    generated through random sampling") and returns the states; step(actions in [-1, 1]) sets
    the prices q = (a + 1) / 2 and returns (states, rewards, done). Reward "utility" is the
    normalised utility; "improvement" is [GenMEN]'s 1 when U_s rose over the last price (which
    a policy sitting at the optimum never earns); "improvement-vs-best" pays 1 when U_s reaches
    the episode's best so far."""

    def __init__(self, draw: GameDraw, horizon: int = 10, batch: int = 1, reward: str = "utility", seed: int = 0,
                 memory: bool = False):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        if horizon < 1 or batch < 1:
            raise ValueError("horizon and batch must be at least 1")
        self.draw, self.horizon, self.batch, self.reward, self.memory = draw, horizon, batch, reward, memory
        self.rng = np.random.default_rng(seed)
        self.games: list[PricingGame] = []
        self.optimum = np.zeros(batch)  # the exact solver's normalised utility, for regret only

    action_size = 1  # the price

    @property
    def observation_size(self) -> int:
        return observation_size(self.draw.devices, self.memory)

    def reset(self, games: list[PricingGame] | None = None) -> np.ndarray:
        self.games = games if games is not None else [self.draw.draw(self.rng) for _ in range(self.batch)]
        self.batch = len(self.games)
        self.optimum = np.array([float(normalised_utility(g, solve_price(g).price)) for g in self.games])
        self.t = 0
        self.bounds = [no_bounds(len(g.theta)) for g in self.games]
        states, self.last = self._respond(self.rng.uniform(0.0, 1.0, self.batch))
        self.best = self.last
        return states

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        q = (np.clip(np.asarray(actions, dtype=float).reshape(self.batch), -1.0, 1.0) + 1.0) / 2.0
        states, utility = self._respond(q)
        if self.reward == "utility":
            rewards = utility
        elif self.reward == "improvement":
            rewards = (utility > self.last).astype(float)
        else:
            rewards = (utility >= np.maximum(self.best, self.last)).astype(float)
        self.best = np.maximum(self.best, utility)
        self.last, self.t = utility, self.t + 1
        return states, rewards, self.t >= self.horizon

    def _respond(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        states, utility = [], []
        for i, (game, fraction) in enumerate(zip(self.games, q)):
            price = float(fraction) * game.server_cost
            responses = follower_response(game, price)
            if self.memory:
                self.bounds[i] = narrow(game, price, responses, self.bounds[i])
            states.append(observe(game, price, responses, self.bounds[i] if self.memory else None))
            utility.append(float(normalised_utility(game, price, responses)))
        self.prices = q
        return np.stack(states), np.asarray(utility)


def check_draw(game: PricingGame) -> None:
    """A learned pricer plays games of at most MAX_DEVICES devices with a positive server cost."""
    if len(game.theta) > MAX_DEVICES:
        raise GameError(f"a learned pricer plays games of at most {MAX_DEVICES} devices; this one has "
                        f"{len(game.theta)} (the exact solver takes up to a million)")
    if game.server_cost <= 0:
        raise GameError("a learned pricer needs a positive server_cost: it sets prices as a fraction of it")
