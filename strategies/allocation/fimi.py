"""FIMI's per-round allocation ([FIMI §IV]): synthetic data, CPU frequency, bandwidth, power.

Given each device's time split eta (T_cmp = eta*T_max, T_com = (1-eta)*T_max, [FIMI Lemma 2]) the
problem separates into
  P6 (compute): choose learning errors delta_i (hence D_gen_i and f_i) to meet the error
     budget of constraint [FIMI eq. 13a] at least compute energy — a clipped closed form with one
     multiplier nu found by root finding ([FIMI Thm. 1] with the gamma erratum fixed);
  P7 (uplink): choose bandwidths b_i (hence P_i) summing to B at least upload energy — a
     Lambert-W lower bound from P_max ([FIMI eq. 31], sign fixed) and one multiplier varpi.
The inner bisection of [FIMI Alg. 2] has a closed form: Q(b) + varpi = 0 with
x = S/(b T_com) reads 2^x (x ln2 - 1) + 1 = varpi g/(N0 T_com), so
x = (1 + W0((varpi g/(N0 T_com) - 1)/e)) / ln2. Only the outer search over varpi remains.
P5, the search over eta: [FIMI]'s cross-entropy method ([FIMI Alg. 3], every candidate of an
iteration evaluated at once) is kept as `search="ce"`; the default `lagrangian_search` reaches
the KKT point exactly and faster, because P1 is convex in log-variables (D^3/T^2 and
b T (2^(S/(bT)) - 1) are convex in (log D, log T) and (log b, log T), and the constraints stay
convex there). The benchmark shows both. Every array has the devices on its last axis and candidates in front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .costs import LN2, update_bits
from .numerics import bracketed_newton, lambert_w0, lambert_wm1
from .scenario import Scenario


@dataclass(frozen=True)
class FimiProblem:
    """A scenario with the per-device constants the solvers reuse."""

    scenario: Scenario
    s_bits: np.ndarray  # update size per device
    allow_synthetic: bool = True  # False: TFL, D_gen = 0 and no learning-error constraint
    equal_band: bool = False  # True: every device gets B/N (the "w/o BA" ablation), no band allocation

    @classmethod
    def build(cls, scenario: Scenario, allow_synthetic: bool = True, equal_band: bool = False) -> "FimiProblem":
        """With no synthetic allowance (d_gen_max 0: a run without a generation service) the
        problem is TFL's: the learning error depends on the data amounts alone, which no plan
        can change then, so its constraint binds nothing (met or not, every plan is alike)."""
        s = update_bits(scenario.system.model_params, scenario.devices.bits)
        return cls(scenario, s, allow_synthetic and scenario.system.d_gen_max > 0, equal_band)

    @property
    def band_share(self) -> float:
        """An equal share of the band, B/N: each device's band when equal_band holds."""
        return self.scenario.system.bandwidth_hz / len(self.scenario.devices)

    def fits_share(self, b_min: np.ndarray) -> np.ndarray:
        """Where a device's least band (at P_max) fits in its equal share B/N."""
        return b_min <= self.band_share * (1.0 + 1e-12)

    @property
    def error_budget(self) -> float:
        return self.scenario.system.learning_error_budget(len(self.scenario.devices))

    def eta_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Eqs. 17-18: train the local data at f_max / upload over the whole band at P_max."""
        sy, dv = self.scenario.system, self.scenario.devices
        eta_min = sy.tau * sy.omega * dv.d_loc / (sy.t_max_s * dv.f_max)
        band = self.band_share if self.equal_band else sy.bandwidth_hz  # the most a device can get
        full_band_rate = band * np.log2(1.0 + dv.gain * dv.p_max / (sy.noise_w_per_hz * band))
        eta_max = 1.0 - self.s_bits / (sy.t_max_s * full_band_rate)
        return eta_min, eta_max


# ----------------------------------------------------------------------------- P6: compute

@dataclass
class ComputeSolution:
    delta: np.ndarray
    samples: np.ndarray  # D_loc + D_gen
    d_gen: np.ndarray
    f: np.ndarray
    energy: np.ndarray  # per device
    nu: np.ndarray  # multiplier of the error budget (0 where it does not bind)
    feasible: np.ndarray  # per candidate
    delta_lo: np.ndarray
    delta_hi: np.ndarray


def _compute_terms(problem: FimiProblem, t_cmp: np.ndarray):
    sy, dv = problem.scenario.system, problem.scenario.devices
    work = sy.tau * sy.omega
    d_max = dv.d_loc + (sy.d_gen_max if problem.allow_synthetic else 0.0)
    d_cap = np.minimum(dv.f_max * t_cmp / work, d_max)
    delta_lo = sy.alpha * d_cap ** (-sy.beta) - sy.gamma
    delta_hi = np.broadcast_to(sy.alpha * dv.d_loc ** (-sy.beta) - sy.gamma, t_cmp.shape)
    # rho_i of [FIMI eq. 22]: compute energy = rho_i (gamma + delta_i)^(-3/beta)
    rho = dv.eps * work ** 3 * sy.alpha ** (3.0 / sy.beta) / t_cmp ** 2
    return d_cap, delta_lo, delta_hi, rho


def _delta_at_price(problem: FimiProblem, rho, nu, lo, hi):
    """Stationary point of [FIMI eq. 26c] with the gamma [FIMI] drops: delta = (3 rho/(beta nu))^(beta/(beta+3)) - gamma."""
    sy = problem.scenario.system
    with np.errstate(divide="ignore"):
        free = (3.0 * rho / (sy.beta * nu)) ** (sy.beta / (sy.beta + 3.0)) - sy.gamma
    return np.clip(free, lo, hi)


def solve_compute(problem: FimiProblem, t_cmp: np.ndarray) -> ComputeSolution:
    sy, dv = problem.scenario.system, problem.scenario.devices
    t_cmp = np.atleast_2d(t_cmp)
    d_cap, lo, hi, rho = _compute_terms(problem, t_cmp)
    can_train_local = d_cap >= dv.d_loc * (1.0 - 1e-12)
    lo = np.minimum(lo, hi)
    budget = problem.error_budget
    feasible = np.all(can_train_local, axis=-1)
    nu = np.zeros(t_cmp.shape[0])
    delta = np.array(hi, dtype=float)
    if problem.allow_synthetic:
        feasible &= lo.sum(-1) <= budget * (1.0 + 1e-12) + 1e-12
        active = feasible & (hi.sum(-1) > budget)  # elsewhere the budget is slack: no synthetic data
        if np.any(active):
            p = sy.beta / (sy.beta + 3.0)
            c = (3.0 * rho[active] / sy.beta) ** p  # delta_i(s) = c_i e^(-p s) - gamma before clipping
            a_lo, a_hi = lo[active], hi[active]
            s_of = lambda d: np.log(c / (d + sy.gamma)) / p  # noqa: E731  s at which device i hits delta d

            def excess(s):
                raw = c * np.exp(-p * s[:, None]) - sy.gamma
                free = (raw > a_lo) & (raw < a_hi)
                value = np.clip(raw, a_lo, a_hi).sum(-1) - budget
                slope = -p * np.where(free, raw + sy.gamma, 0.0).sum(-1)
                return value, slope

            s = bracketed_newton(excess, s_of(a_hi).min(-1), s_of(a_lo).max(-1), xtol=1e-13,
                                 ftol=1e-13 * budget)
            nu[active] = np.exp(s)
            delta[active] = np.clip(c * np.exp(-p * s[:, None]) - sy.gamma, a_lo, a_hi)
    samples = ((delta + sy.gamma) / sy.alpha) ** (-1.0 / sy.beta)
    samples = np.where(delta >= hi, dv.d_loc, np.clip(samples, dv.d_loc, None))
    d_gen = np.clip(samples - dv.d_loc, 0.0, sy.d_gen_max)
    f = sy.tau * sy.omega * samples / t_cmp
    energy = dv.eps * sy.tau * sy.omega * samples * f ** 2
    return ComputeSolution(delta, samples, d_gen, f, energy, nu, feasible, lo, hi)


# ----------------------------------------------------------------------------- P7: uplink

@dataclass
class UplinkSolution:
    b: np.ndarray
    p: np.ndarray
    energy: np.ndarray  # per device
    varpi: np.ndarray  # multiplier of the bandwidth constraint
    b_min: np.ndarray  # least bandwidth at P_max
    feasible: np.ndarray  # per candidate


def min_bandwidth(problem: FimiProblem, t_com: np.ndarray) -> np.ndarray:
    """[FIMI eq. 31] with its sign fixed: the bandwidth at which P(b) = P_max (inf if none).

    P(b) falls with b towards N0 S ln2 /(g T_com) as b grows; with kappa = N0 S ln2 /(g P_max)
    and a = kappa / T_com < 1, b_min = S ln2 / (T_com (-W_{-1}(-a e^-a) - a)).
    """
    sy, dv = problem.scenario.system, problem.scenario.devices
    kappa = sy.noise_w_per_hz * problem.s_bits * LN2 / (dv.gain * dv.p_max)
    a = kappa / t_com
    reachable = a < 1.0
    a_ok = np.where(reachable, a, 0.5)
    w = lambert_wm1(-a_ok * np.exp(-a_ok))
    with np.errstate(divide="ignore"):
        b_min = problem.s_bits * LN2 / (t_com * (-w - a_ok))
    return np.where(reachable & (b_min > 0), b_min, np.inf)


def _uplink_marginal_price(problem: FimiProblem, t_com, b):
    """-Q(b) of [FIMI eq. 34]: the upload energy saved per extra Hz, (N0 T/g)(2^x (x ln2 - 1) + 1)."""
    sy, dv = problem.scenario.system, problem.scenario.devices
    x = np.minimum(problem.s_bits / (b * t_com), 1000.0)
    return sy.noise_w_per_hz * t_com / dv.gain * (np.exp2(x) * (x * LN2 - 1.0) + 1.0)


def _bandwidth_at_price(problem: FimiProblem, t_com, varpi, b_min):
    """b_i(varpi) solving Q(b) + varpi = 0 in closed form, floored at b_min ([FIMI eq. 38])."""
    sy, dv = problem.scenario.system, problem.scenario.devices
    z = (varpi * dv.gain / (sy.noise_w_per_hz * t_com) - 1.0) / np.e
    w = lambert_w0(z)
    with np.errstate(divide="ignore"):
        b = problem.s_bits * LN2 / (t_com * (1.0 + w))
    return np.maximum(b, b_min), w, z


def solve_uplink(problem: FimiProblem, t_com: np.ndarray) -> UplinkSolution:
    sy, dv = problem.scenario.system, problem.scenario.devices
    t_com = np.atleast_2d(t_com)
    bw = sy.bandwidth_hz
    b_min = min_bandwidth(problem, t_com)
    feasible = np.all(np.isfinite(b_min), axis=-1) & (b_min.sum(-1) <= bw * (1.0 + 1e-12))
    b = np.array(b_min, dtype=float)
    varpi = np.full(t_com.shape[0], np.inf)
    if problem.equal_band:  # no allocation: B/N each, enough where b_min fits in it
        fits = problem.fits_share(b_min)
        feasible = np.all(fits, axis=-1)
        b = np.where(fits, problem.band_share, np.inf)
        varpi[:] = 0.0  # no shared band constraint to price
    elif np.any(feasible):
        t_f, bmin_f = t_com[feasible], b_min[feasible]
        # varpi between the price at which one device alone would take all of B and the price
        # at which every device is already down to b_min ([FIMI eq. 40])
        lo = np.log(_uplink_marginal_price(problem, t_f, bw).min(-1))
        hi = np.log(np.maximum(_uplink_marginal_price(problem, t_f, bmin_f).max(-1), np.exp(lo) * (1 + 1e-9)))

        def excess(t):
            varpi_ = np.exp(t)[:, None]
            b_, w, z = _bandwidth_at_price(problem, t_f, varpi_, bmin_f)
            free = b_ > bmin_f
            db_dt = -(z + 1.0 / np.e) * problem.s_bits * LN2 / (t_f * (1.0 + w) ** 3 * np.exp(w))
            return b_.sum(-1) - bw, np.where(free, db_dt, 0.0).sum(-1)

        t = bracketed_newton(excess, lo, hi, xtol=1e-13, ftol=1e-12 * bw)
        varpi[feasible] = np.exp(t)
        b[feasible] = _bandwidth_at_price(problem, t_f, varpi[feasible][:, None], bmin_f)[0]
    b_safe = np.where(np.isfinite(b), b, 1.0)
    x = problem.s_bits / (b_safe * t_com)
    p = np.where(np.isfinite(b), sy.noise_w_per_hz * b_safe / dv.gain * np.expm1(LN2 * x), np.inf)
    return UplinkSolution(b, p, p * t_com, varpi, b_min, feasible)


# ------------------------------------------------------------------- P5: the time split eta

def round_energy(problem: FimiProblem, eta: np.ndarray) -> np.ndarray:
    """E_round for each candidate row of eta; inf where the candidate is infeasible."""
    t_max = problem.scenario.system.t_max_s
    eta = np.atleast_2d(eta)
    cmp_ = solve_compute(problem, eta * t_max)
    com = solve_uplink(problem, (1.0 - eta) * t_max)
    total = cmp_.energy.sum(-1) + com.energy.sum(-1)
    return np.where(cmp_.feasible & com.feasible, total, np.inf)


@dataclass(frozen=True)
class CrossEntropySettings:
    """[FIMI Alg. 3]'s constants, which [FIMI] leaves open. From the sweep in
    bench/bench_allocation.py on 20 devices: 32 samples stall 10% above the optimum, 64 stop
    1.5% above, 128 with 16 elites reach it, at about the same wall time (numpy overhead, not
    arithmetic, dominates at this size); sigma falls below 1e-3 of the interval within 60
    iterations. In hundreds of dimensions no setting we tried gets within 30% (the bench
    prints it), which is why the Lagrangian search is the default."""

    samples: int = 128  # M
    elites: int = 16  # K
    iterations: int = 60  # J
    smoothing: float = 0.7  # weight of the new elite estimate in mu, sigma ([FIMI eqs. 42a-b])
    sigma_tol: float = 1e-4  # stop once every device's sigma, relative to its interval, is below


@dataclass
class SearchTrace:
    best_energy: list[float] = field(default_factory=list)  # after each CE iteration
    elite_mean_energy: list[float] = field(default_factory=list)
    max_sigma: list[float] = field(default_factory=list)
    refine_energy: list[float] = field(default_factory=list)  # after each refinement step


def cross_entropy_search(problem: FimiProblem, rng: np.random.Generator,
                         settings: CrossEntropySettings, trace: SearchTrace) -> np.ndarray:
    """[FIMI Alg. 3] on eta in [eta_min, eta_max]; returns the best candidate evaluated.

    Departures from [FIMI], each for a reason: mu starts at the middle of each device's
    feasible interval (0.5 may lie outside it) and sigma at half its width (sigma = 1 is wider
    than (0, 1) and piles clipped samples on the bounds); the current mean is evaluated with
    the samples so the returned point is never worse than the mean; [FIMI eqs. 41-42] are garbled,
    we use the elites' mean and standard deviation smoothed with the previous profile.
    """
    eta_min, eta_max = problem.eta_bounds()
    width = eta_max - eta_min
    mu, sigma = eta_min + 0.5 * width, 0.5 * width
    best_eta, best_energy = mu, float(round_energy(problem, mu)[0])
    for _ in range(settings.iterations):
        candidates = np.clip(mu + sigma * rng.standard_normal((settings.samples - 1, mu.size)), eta_min, eta_max)
        candidates = np.vstack([mu, candidates])
        energy = round_energy(problem, candidates)
        order = np.argsort(energy, kind="stable")
        elites = candidates[order[:settings.elites]]
        if energy[order[0]] < best_energy:
            best_energy, best_eta = float(energy[order[0]]), candidates[order[0]]
        rho = settings.smoothing
        mu = rho * elites.mean(0) + (1.0 - rho) * mu
        sigma = rho * elites.std(0) + (1.0 - rho) * sigma
        trace.best_energy.append(best_energy)
        trace.elite_mean_energy.append(float(np.mean(energy[order[:settings.elites]])))
        relative_sigma = float(np.max(sigma / np.maximum(width, 1e-300)))
        trace.max_sigma.append(relative_sigma)
        if relative_sigma < settings.sigma_tol:
            break
    return best_eta


def _device_response(problem: FimiProblem, eta, nu, varpi):
    """Phi_i(eta_i): device i's energy plus the priced use of the shared budgets, each inner
    variable at its best response to the prices (nu for error, varpi for bandwidth).
    Returns (Phi, delta, b) so callers can also read what the response consumes. Prices may
    be arrays broadcasting against eta (several price pairs tried at once)."""
    sy, dv = problem.scenario.system, problem.scenario.devices
    t_cmp, t_com = eta * sy.t_max_s, (1.0 - eta) * sy.t_max_s
    d_cap, lo, hi, rho = _compute_terms(problem, t_cmp)
    lo = np.minimum(lo, hi)
    nu = np.asarray(nu, dtype=float)
    varpi = np.asarray(varpi, dtype=float)
    priced = np.isfinite(varpi)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(nu > 0, _delta_at_price(problem, rho, np.where(nu > 0, nu, 1.0), lo, hi), hi)
    e_cmp = rho * (sy.gamma + delta) ** (-3.0 / sy.beta) + nu * delta
    b_min = min_bandwidth(problem, t_com)
    if problem.equal_band:
        b_min = np.where(problem.fits_share(b_min), b_min, np.inf)
        b = np.full_like(b_min, problem.band_share)
        priced = np.zeros_like(priced)
    else:
        b = np.where(priced, _bandwidth_at_price(problem, t_com, np.where(priced, varpi, 1.0), b_min)[0], b_min)
    x = problem.s_bits / (b * t_com)
    e_com = sy.noise_w_per_hz * b / dv.gain * np.expm1(LN2 * x) * t_com + np.where(priced, varpi, 0.0) * b
    return np.where(np.isfinite(b_min), e_cmp + e_com, np.inf), delta, b


def lagrangian_search(problem: FimiProblem, eta: np.ndarray, trace: SearchTrace,
                      max_steps: int = 60, rtol: float = 1e-10) -> np.ndarray:
    """Drive eta from a feasible start to the KKT point of P5.

    At the optimum each device's eta_i minimises its own Lagrangian Phi_i at the optimal
    prices (nu, varpi). So: read the prices off the current eta, let every device move to its
    best eta_i under them (golden section: Phi_i is unimodal in eta_i because the problem is
    convex in log-variables), and take the largest step toward that point that lowers the
    round energy. At a fixed point the KKT conditions of the full problem hold.
    """
    eta_min, eta_max = problem.eta_bounds()
    t_max = problem.scenario.system.t_max_s
    energy = float(round_energy(problem, eta)[0])
    steps = np.array([1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125])
    clearing = False
    for _ in range(max_steps):
        nu = float(solve_compute(problem, eta * t_max).nu[0])
        varpi = float(solve_uplink(problem, (1.0 - eta) * t_max).varpi[0])
        if clearing:
            nu, varpi = _clearing_prices(problem, nu, varpi, eta_min, eta_max)
        target = _best_response(problem, nu, varpi, eta_min, eta_max)
        candidates = eta + steps[:, None] * (target - eta)
        energies = round_energy(problem, candidates)
        k = int(np.argmin(energies))
        if not energies[k] < energy * (1.0 - rtol):
            settled = np.max(np.abs(target - eta) / np.maximum(eta_max - eta_min, 1e-300)) < 1e-5
            if clearing or settled:
                break  # settled: every device already sits at its best response (KKT)
            clearing = True  # the prices read off eta understate a bound constraint: clear the market
            continue
        eta, energy = candidates[k], float(energies[k])
        trace.refine_energy.append(energy)
    return eta


def _clearing_prices(problem: FimiProblem, nu, varpi, eta_min, eta_max, rounds: int = 2):
    """Prices at which the devices' best responses use exactly the error budget and the band.

    The prices read off a given eta come from the devices not at a bound; when most devices
    sit at P_max (or f_max) those understate the real shadow price, every best response asks
    for more band (or error) than there is, and no step toward it is feasible. Demand for each
    resource falls as its price rises, so each price is found by a search in log space that
    tries 8 prices per level in one batch, the two prices in alternation.
    """
    budget, band = problem.error_budget, problem.scenario.system.bandwidth_hz

    def clear(price, demand, supply):
        lo, hi = np.log(price) - 12.0, np.log(price) + 12.0
        for _ in range(7):  # each level shrinks the interval 9-fold: 24 -> 5e-6 in log
            trial = np.linspace(lo, hi, 10)[1:-1]
            over = demand(np.exp(trial)) > supply
            k = int(np.argmin(over)) if not over.all() else trial.size  # first price that clears
            lo = trial[k - 1] if k > 0 else lo
            hi = trial[k] if k < trial.size else hi
        return float(np.exp(hi))  # the clearing side

    def used(nu_, varpi_):
        nu_, varpi_ = np.broadcast_arrays(np.asarray(nu_, float), np.asarray(varpi_, float))
        target = _best_response(problem, nu_, varpi_, eta_min, eta_max, zooms=3)  # 1/4096 of the width
        _, delta, b = _device_response(problem, target, nu_[:, None], varpi_[:, None])
        return delta.sum(-1), b.sum(-1)

    for _ in range(rounds):
        if np.isfinite(varpi) and varpi > 0:
            varpi = clear(varpi, lambda v: used(nu, v)[1], band)
        if problem.allow_synthetic and nu > 0:
            nu = clear(nu, lambda n: used(n, varpi)[0], budget)
    return nu, varpi


def _best_response(problem: FimiProblem, nu, varpi, eta_min, eta_max, points: int = 33, zooms: int = 5):
    """argmin over eta_i of Phi_i for every device: a grid, then grids zoomed on the best cell.

    Phi_i is unimodal, so its minimum lies within one cell of the best grid point; each zoom
    shrinks the interval 16-fold (33 points), five zooms to 1e-6 of the feasible width.
    Scalar prices give one eta per device; arrays of K prices give K rows.
    """
    nu, varpi = np.asarray(nu, dtype=float), np.asarray(varpi, dtype=float)
    batch = nu.shape  # () or (K,)
    price_shape = batch + (1, 1)
    lo = np.broadcast_to(eta_min, batch + eta_min.shape)
    hi = np.broadcast_to(eta_max, batch + eta_max.shape)
    fractions = np.linspace(0.0, 1.0, points)[:, None]
    for _ in range(zooms):
        grid = lo[..., None, :] + (hi - lo)[..., None, :] * fractions
        phi = _device_response(problem, grid, nu.reshape(price_shape), varpi.reshape(price_shape))[0]
        best = np.take_along_axis(grid, np.argmin(phi, axis=-2)[..., None, :], axis=-2)[..., 0, :]
        cell = (hi - lo) / (points - 1)
        lo, hi = np.maximum(eta_min, best - cell), np.minimum(eta_max, best + cell)
    return best


SEARCHES = ("lagrangian", "ce")


def feasible_start(problem: FimiProblem) -> np.ndarray | None:
    """The best of 49 splits eta = eta_min + lambda (eta_max - eta_min): a feasible start when
    one exists on that line (None otherwise), found in one batched evaluation."""
    eta_min, eta_max = problem.eta_bounds()
    candidates = eta_min + np.linspace(0.02, 0.98, 49)[:, None] * (eta_max - eta_min)
    energy = round_energy(problem, candidates)
    k = int(np.argmin(energy))
    return candidates[k] if np.isfinite(energy[k]) else None


def search_time_split(problem: FimiProblem, search: str | Callable[[FimiProblem], np.ndarray],
                      rng: np.random.Generator, settings: CrossEntropySettings,
                      trace: SearchTrace) -> np.ndarray | None:
    """eta for every device, or None when no feasible split was found.

    `search` is a name in SEARCHES or a callable problem -> eta: the hook through which a
    search living elsewhere (the learned one of strategies/learned/time_split.py, which needs
    torch) plugs in while this package stays numpy/scipy only. A callable's answer passes the
    same feasibility check as ours; one of the wrong shape is a ValueError, not a plan.
    """
    if callable(search):
        eta = search(problem)
        if eta is None:
            return None
        eta = np.asarray(eta, dtype=float)
        if eta.shape != problem.s_bits.shape:
            raise ValueError(f"a time-split search must return one eta per device, shape "
                             f"{problem.s_bits.shape}, got shape {eta.shape}")
        if not np.all(np.isfinite(eta)):
            return None
    elif search == "ce":
        eta = cross_entropy_search(problem, rng, settings, trace)
    elif search == "lagrangian":
        eta = feasible_start(problem)
        if eta is None:
            return None
        eta = lagrangian_search(problem, eta, trace)
    else:
        raise ValueError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)} or pass a callable")
    return eta if np.isfinite(round_energy(problem, eta)[0]) else None


# -------------------------------------------------- per-class augmentation policy ([FIMI eq. 47])
