"""A general-purpose baseline: P1 handed to scipy's SLSQP in its original variables.

No decomposition, no closed forms: per device D_gen, f, b, P (scaled to [0, 1]) with the
learning-error, latency and bandwidth constraints as written in [FIMI eqs. 12a-f]. It exists
to check the FIMI solver (tests) and to measure what the decomposition buys (bench); it is
slow and may stop at a local point, hence the multiple starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from .costs import compute_energy, compute_time, uplink_rate
from .fimi import FimiProblem


@dataclass
class ReferenceResult:
    energy: float  # inf when no start converged to a feasible point
    d_gen: np.ndarray
    f: np.ndarray
    b: np.ndarray
    p: np.ndarray
    seconds: float
    starts: int


def solve_reference(problem: FimiProblem, starts: int = 8, seed: int = 0, feas_tol: float = 1e-6) -> ReferenceResult:
    sy, dv = problem.scenario.system, problem.scenario.devices
    n = len(dv)
    d_max = sy.d_gen_max if problem.allow_synthetic else 0.0
    floor = 1e-4  # keep f, b, P off zero where the model divides by them

    def unpack(u):
        u = u.reshape(4, n)
        return (u[0] * d_max, dv.f_max * u[1], sy.bandwidth_hz * u[2], dv.p_max * u[3])

    def energy(u):
        d_gen, f, b, p = unpack(u)
        d = dv.d_loc + d_gen
        t_com = problem.s_bits / uplink_rate(b, p, dv.gain, sy.noise_w_per_hz)
        return float(np.sum(compute_energy(dv.eps, sy.tau, sy.omega, d, f)) + np.sum(p * t_com))

    def latency_slack(u):  # >= 0 per device, in units of T_max
        d_gen, f, b, p = unpack(u)
        t = compute_time(sy.tau, sy.omega, dv.d_loc + d_gen, f) + problem.s_bits / uplink_rate(b, p, dv.gain, sy.noise_w_per_hz)
        return 1.0 - t / sy.t_max_s

    def error_slack(u):  # >= 0: the error budget of [FIMI eq. 13a] is met
        d_gen = unpack(u)[0]
        delta = sy.alpha * (dv.d_loc + d_gen) ** (-sy.beta) - sy.gamma
        return np.array([(problem.error_budget - delta.sum()) / n])

    def bandwidth_slack(u):
        return np.array([1.0 - u.reshape(4, n)[2].sum()])

    constraints = [{"type": "ineq", "fun": latency_slack}, {"type": "ineq", "fun": bandwidth_slack}]
    if problem.allow_synthetic:
        constraints.append({"type": "ineq", "fun": error_slack})
    bounds = [(0.0, 1.0)] * n + [(floor, 1.0)] * (3 * n)
    rng = np.random.default_rng(seed)
    best_u, best_e = None, np.inf
    start_time = time.perf_counter()
    for _ in range(starts):
        u0 = rng.uniform(0.2, 1.0, 4 * n)
        u0[2 * n:3 * n] = 1.0 / n  # an even bandwidth split is always inside sum b <= B
        res = minimize(energy, u0, method="SLSQP", bounds=bounds, constraints=constraints,
                       options={"maxiter": 1000, "ftol": 1e-12})
        u = np.clip(res.x, [b[0] for b in bounds], [b[1] for b in bounds])
        ok = (latency_slack(u).min() >= -feas_tol and bandwidth_slack(u)[0] >= -feas_tol
              and (not problem.allow_synthetic or error_slack(u)[0] >= -feas_tol))
        if ok and energy(u) < best_e:
            best_u, best_e = u, energy(u)
    seconds = time.perf_counter() - start_time
    if best_u is None:
        nan = np.full(n, np.nan)
        return ReferenceResult(np.inf, nan, nan, nan, nan, seconds, starts)
    d_gen, f, b, p = unpack(best_u)
    return ReferenceResult(best_e, d_gen, f, b, p, seconds, starts)
