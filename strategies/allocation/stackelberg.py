"""The pricing game of [GenMEN]'s case study, as reconstructed (the paper prints none of its
utilities' symbols; docs/references.md), solved exactly.

A leader (the server) sets one price p per piece of work; device n (a follower) takes on
l_n of its units, each worth w_n pieces (its weight, 1 unless given), with
0 <= l_n <= cap_n = min(units_n, (capacity_n - fixed_n) / a_n), to maximise

    U_n(l) = p * w_n * l + theta_n * ln(1 + capacity_n - a_n * l - fixed_n)      (a_n: unit_cost)

preferring the larger l at equal utility. The leader maximises

    U_s(p) = revenue - sum_n w_n [ p * l_n(p) + server_cost * (units_n - l_n(p)) ].

(In a federated run a unit is one sampler step of all m_n images a device needs, so w_n = m_n
step-images and one price per step-image holds for every device.)

- The follower's best response is closed form: l = clip(A - theta / p, 0, cap) with
  A = (1 + capacity - fixed) / a in the continuous game (theta / (w p) for theta / p when
  weighted); in whole units, l = #{l : pi_l <= p} over its thresholds
  pi_l = (theta / w) * ln[(1 + capacity - fixed - a l) / (1 + capacity - fixed - a (l+1))].
- The leader's continuous problem is piecewise smooth but not concave: the prices where a
  device starts taking work (theta / A) or reaches its cap (theta / (A - cap)) split the price
  axis; on each piece U_s = const - c1 p - c2 / p, whose stationary point sqrt(c2 / c1) and
  the piece's ends are the only candidates. A sweep over the sorted breakpoints finds the
  optimum in O(N log N).
- In whole units U_s is linear and decreasing between consecutive thresholds, so the optimum
  is p = 0 or one of the thresholds: a sweep over them, O(T log T) for T thresholds in all.
- Pricing each device on its own (one price each) bounds what any uniform price can reach.

numpy only, like every solver here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

MAX_DEVICES = 1_000_000
# No number of a game may exceed this: sums and products of a million devices' figures stay far
# inside float range (a server cost of 1e308 overflowed the leader's utility)
MAX_VALUE = 1e15
MIN_UNIT_COST = 1e-12  # below it the units a device's compute allows overflow the sums
MAX_THRESHOLDS = 20_000_000  # whole units over all devices, for the integer game
DEVICE_FIELDS = ("theta", "capacity", "unit_cost", "fixed_cost", "units")
OPTIONAL_FIELDS = {"weight": 1.0}  # pieces of work per unit
FIELDS = DEVICE_FIELDS + tuple(OPTIONAL_FIELDS)


class GameError(ValueError):
    """A game file or game that cannot be solved, with the reason."""


@dataclass(frozen=True)
class PricingGame:
    theta: np.ndarray
    capacity: np.ndarray
    unit_cost: np.ndarray
    fixed_cost: np.ndarray
    units: np.ndarray
    server_cost: float
    revenue: float = 0.0
    integer: bool = False
    weight: np.ndarray | None = None  # None: every unit is one piece of work

    def __post_init__(self):
        if self.weight is None:
            object.__setattr__(self, "weight", np.ones_like(np.atleast_1d(np.asarray(self.theta, dtype=float))))
        arrays = {name: np.atleast_1d(np.asarray(getattr(self, name), dtype=float)) for name in FIELDS}
        n = len(arrays["theta"])
        if not 1 <= n <= MAX_DEVICES:
            raise GameError(f"a game needs 1 to {MAX_DEVICES} devices, got {n}")
        for name, values in arrays.items():
            if values.shape != (n,):
                raise GameError(f"'{name}' must hold one number per device ({n}), got shape {values.shape}")
            if not np.all(np.isfinite(values)):
                raise GameError(f"'{name}' must be finite: device {int(np.flatnonzero(~np.isfinite(values))[0])}")
            if np.any(values < 0):
                raise GameError(f"'{name}' must not be negative: device {int(np.flatnonzero(values < 0)[0])}")
            if np.any(values > MAX_VALUE):
                raise GameError(f"'{name}' must be at most {MAX_VALUE:g}: device "
                                f"{int(np.flatnonzero(values > MAX_VALUE)[0])}")
            object.__setattr__(self, name, values)
        for name in ("theta", "unit_cost", "units", "weight"):
            if np.any(arrays[name] <= 0):
                raise GameError(f"'{name}' must be positive: device {int(np.flatnonzero(arrays[name] <= 0)[0])}")
        cheap = np.flatnonzero(arrays["unit_cost"] < MIN_UNIT_COST)
        if len(cheap):
            raise GameError(f"'unit_cost' must be at least {MIN_UNIT_COST:g}: device {int(cheap[0])}")
        short = np.flatnonzero(arrays["capacity"] < arrays["fixed_cost"])
        if len(short):
            raise GameError(f"device {int(short[0])}: capacity {arrays['capacity'][short[0]]:g} is below its fixed "
                            f"cost {arrays['fixed_cost'][short[0]]:g}")
        for name in ("server_cost", "revenue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_VALUE:
                raise GameError(f"'{name}' must be a number in [0, {MAX_VALUE:g}], got {value!r}")
        if not isinstance(self.integer, bool):
            raise GameError(f"'integer' must be true or false, got {self.integer!r}")
        if self.integer and float(np.floor(self.cap).sum()) > MAX_THRESHOLDS:
            raise GameError(f"the integer game has {float(np.floor(self.cap).sum()):.3g} units in all, more than "
                            f"{MAX_THRESHOLDS:,} this solver enumerates")

    @property
    def reach(self) -> np.ndarray:
        """A_n = (1 + capacity - fixed) / a: where the unclipped response tends as p grows."""
        return (1.0 + self.capacity - self.fixed_cost) / self.unit_cost

    @property
    def cap(self) -> np.ndarray:
        """The most units a device can take on: its units, or what its compute allows."""
        return np.minimum(self.units, (self.capacity - self.fixed_cost) / self.unit_cost)

    def thresholds(self, device: int) -> np.ndarray:
        """pi_l for l = 0 .. floor(cap) - 1: the prices at which the device goes from l to l+1 units."""
        values, owner = self.all_thresholds()
        return values[owner == device]

    def all_thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """Every device's thresholds pi_l in one array, device by device, and the device each
        belongs to: computed at once (a loop over 40,000 devices took seconds)."""
        cached = self.__dict__.get("_thresholds")
        if cached is None:
            counts = np.floor(self.cap).astype(np.int64)
            owner = np.repeat(np.arange(len(counts)), counts)
            steps = (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)).astype(float)
            left = (1.0 + self.capacity - self.fixed_cost)[owner]
            a = self.unit_cost[owner]
            values = self.theta[owner] / self.weight[owner] * np.log((left - a * steps) / (left - a * (steps + 1)))
            cached = (values, owner)
            object.__setattr__(self, "_thresholds", cached)
        return cached

    def public(self) -> dict:
        """What the leader may see of the game: everything but the devices' theta."""
        return {name: getattr(self, name) for name in ("capacity", "unit_cost", "fixed_cost", "units", "weight",
                                                       "server_cost", "revenue", "integer")}


@dataclass(frozen=True)
class PriceSolution:
    price: float
    responses: np.ndarray  # l_n at the price
    leader_utility: float
    utility_without_offloading: float  # U_s(0): the server runs everything


def load_game(path) -> PricingGame:
    try:
        text = open(path).read()
    except OSError as err:
        raise GameError(f"{path}: {err.strerror or err}") from None
    return parse_game(text)


def parse_game(text: str) -> PricingGame:
    """A game file: {"server_cost", "revenue", "integer", "devices": [{theta, capacity,
    unit_cost, fixed_cost, units, weight (optional, 1)}, ...]}; GameError saying what is wrong."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise GameError(f"not a JSON game file: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise GameError("a game file is a JSON object")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices:
        raise GameError("'devices' must be a non-empty list")
    if len(devices) > MAX_DEVICES:
        raise GameError(f"a game needs 1 to {MAX_DEVICES} devices, got {len(devices)}")
    columns = {name: [] for name in FIELDS}
    for i, device in enumerate(devices):
        if not isinstance(device, dict):
            raise GameError(f"device {i} must be an object with {', '.join(DEVICE_FIELDS)}")
        for name in FIELDS:
            value = device.get(name, OPTIONAL_FIELDS.get(name))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GameError(f"device {i}: '{name}' must be a number, got {str(value)[:40]}")
            columns[name].append(_float(value, f"device {i}: '{name}'"))
    for name in ("server_cost", "revenue"):
        value = data.get(name, 0.0 if name == "revenue" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GameError(f"'{name}' must be a number, got {str(value)[:40]}")
    return PricingGame(**{k: np.asarray(v) for k, v in columns.items()},
                       server_cost=_float(data["server_cost"], "'server_cost'"),
                       revenue=_float(data.get("revenue", 0.0), "'revenue'"), integer=data.get("integer", False))


def _float(value, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of more digits than a float holds
        raise GameError(f"{where} must be at most {MAX_VALUE:g}, got an integer of {len(str(value))} digits") from None


def follower_response(game: PricingGame, price) -> np.ndarray:
    """l_n(p) for each device (rows: prices when `price` is an array), ties to the larger l."""
    prices = np.asarray(price, dtype=float)
    p = prices[..., None]
    if game.integer:
        values, owner = game.all_thresholds()
        if prices.ndim == 0:  # one price: count each device's thresholds at or below it, all at once
            return np.bincount(owner[values <= prices], minlength=len(game.theta)).astype(float)
        out = np.zeros(p.shape[:-1] + (len(game.theta),))
        for n in range(len(game.theta)):
            out[..., n] = np.searchsorted(values[owner == n], prices, side="right")
        return out
    with np.errstate(divide="ignore"):
        interior = game.reach - game.theta / (p * game.weight)
    return np.clip(np.where(p > 0, interior, 0.0), 0.0, game.cap)


def leader_utility(game: PricingGame, price, responses=None) -> np.ndarray:
    responses = follower_response(game, price) if responses is None else responses
    p = np.asarray(price, dtype=float)
    w = game.weight
    return game.revenue - (p * (w * responses).sum(axis=-1) + game.server_cost * (w * (game.units - responses)).sum(axis=-1))


def solve_price(game: PricingGame) -> PriceSolution:
    """The leader's optimal uniform price, exactly (continuous or integer game)."""
    base = _utility_without_offloading(game)
    candidates = _integer_candidates(game) if game.integer else _continuous_candidates(game)
    prices, values = candidates
    best = int(np.argmax(values))
    if not values[best] > base:  # offloading nothing is optimal: the smallest such price, 0
        price = 0.0
    else:
        price = float(prices[best])
    responses = follower_response(game, price)
    return PriceSolution(price, responses, float(leader_utility(game, price, responses)), base)


def _continuous_candidates(game: PricingGame) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate price of the continuous game and U_s there, by one sweep of the
    breakpoints with running sums over the interior (S_A, S_theta) and capped (S_cap) devices,
    all counted in pieces of work (units times weight)."""
    reach, cap, theta, kappa = game.reach * game.weight, game.cap * game.weight, game.theta, game.server_cost
    enter = theta / reach  # l starts growing above this price
    capped = reach > cap
    full = np.where(capped, theta / np.where(capped, reach - cap, 1.0), np.inf)  # l reaches cap here
    # events: at `enter` a device joins the interior; at `full` it leaves it for the cap
    prices = np.concatenate([enter, full[capped]])
    d_reach = np.concatenate([reach, -reach[capped]])
    d_theta = np.concatenate([theta, -theta[capped]])
    d_cap = np.concatenate([np.zeros_like(reach), cap[capped]])
    order = np.argsort(prices, kind="stable")
    prices, d_reach, d_theta, d_cap = prices[order], d_reach[order], d_theta[order], d_cap[order]
    s_reach, s_theta, s_cap = np.cumsum(d_reach), np.cumsum(d_theta), np.cumsum(d_cap)
    base = _utility_without_offloading(game)

    def value(p, sr, st, sc):  # U_s on a piece: base - (p - kappa) (S_A + S_cap - S_theta / p)
        return base - (p - kappa) * (sr + sc - st / p)

    lo = prices
    hi = np.append(prices[1:], np.inf)
    s1 = s_reach + s_cap
    with np.errstate(divide="ignore", invalid="ignore"):
        stationary = np.sqrt(kappa * np.maximum(s_theta, 0.0) / s1)
    stationary = np.clip(np.nan_to_num(stationary, nan=0.0, posinf=0.0), lo, hi)
    ends = np.where(np.isfinite(hi), hi, lo)
    points = np.concatenate([lo, stationary, ends])
    sums = [np.tile(s, 3) for s in (s_reach, s_theta, s_cap)]
    # the right end of a piece is on the next piece too (U_s is continuous): this piece's sums hold there
    values = value(points, *sums)
    keep = (points > 0) & np.isfinite(values)
    return points[keep], values[keep]


def _integer_candidates(game: PricingGame) -> tuple[np.ndarray, np.ndarray]:
    """Every threshold (and U_s there: base - (p - kappa) * the work of the thresholds <= p)."""
    thresholds, owner = game.all_thresholds()
    base = _utility_without_offloading(game)
    if not len(thresholds):
        return np.zeros(1), np.array([base])
    work = game.weight[owner]
    order = np.argsort(thresholds, kind="stable")
    thresholds, work = thresholds[order], np.cumsum(work[order])
    taken = work[np.searchsorted(thresholds, thresholds, side="right") - 1]  # ties: every equal threshold taken
    return thresholds, base - (thresholds - game.server_cost) * taken


def _utility_without_offloading(game: PricingGame) -> float:
    return game.revenue - game.server_cost * float((game.weight * game.units).sum())


def solve_discriminatory(game: PricingGame) -> tuple[np.ndarray, float]:
    """(one price per device, U_s): each device priced on its own, the upper bound of what a
    uniform price can reach."""
    prices = np.zeros(len(game.theta))
    total = _utility_without_offloading(game)
    for n in range(len(game.theta)):
        single = PricingGame(*(np.asarray(getattr(game, f))[n:n + 1] for f in DEVICE_FIELDS),
                             server_cost=game.server_cost, revenue=0.0, integer=game.integer,
                             weight=game.weight[n:n + 1])
        solution = solve_price(single)
        prices[n] = solution.price
        total += solution.leader_utility - solution.utility_without_offloading
    return prices, float(total)
