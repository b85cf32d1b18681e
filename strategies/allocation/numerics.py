"""Vectorized numerics the solvers share: real Lambert W branches and a bracketed Newton.

scipy.special.lambertw is exact but complex-valued and about 50x slower than exp; the CE
search evaluates W millions of times per plan, so we run Halley's iteration on real arrays
from a good start and check it against scipy in the tests.
"""

from __future__ import annotations

import numpy as np

_E = np.e
_BRANCH = -1.0 / np.e


def _halley(w: np.ndarray, z: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        ew = np.exp(w)
        f = w * ew - z
        wp1 = w + 1.0
        # Where w sits on the branch point -1 the step is 0/0; those entries are already exact.
        with np.errstate(divide="ignore", invalid="ignore"):
            step = f / (ew * wp1 - (w + 2.0) * f / (2.0 * wp1))
        w = w - np.where(np.isfinite(step), step, 0.0)
    return w


def lambert_w0(z) -> np.ndarray:
    """Principal branch W0(z) for real z >= -1/e (the value w >= -1 with w e^w = z)."""
    z = np.asarray(z, dtype=float)
    z = np.maximum(z, _BRANCH)
    p = np.sqrt(np.maximum(2.0 * (_E * np.minimum(z, 0.5) + 1.0), 0.0))
    near_branch = -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p ** 3
    lz = np.log(np.maximum(z, 3.0))
    asymptotic = lz - np.log(lz) + np.log(lz) / lz
    w = np.where(z < 0.5, near_branch, np.where(z < 3.0, np.log1p(z) * 0.8, asymptotic))
    return _halley(w, z, 4)


def lambert_wm1(z) -> np.ndarray:
    """Lower branch W_{-1}(z) for real z in [-1/e, 0) (the value w <= -1 with w e^w = z)."""
    z = np.asarray(z, dtype=float)
    z = np.clip(z, _BRANCH, -1e-300)
    p = -np.sqrt(np.maximum(2.0 * (_E * z + 1.0), 0.0))
    near_branch = -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p ** 3
    l1 = np.log(-z)
    l2 = np.log(-l1)
    near_zero = l1 - l2 + l2 / l1
    w = np.where(z < -0.25, near_branch, near_zero)
    return _halley(w, z, 4)


def bracketed_newton(fun, lo, hi, *, xtol: float = 1e-12, ftol: float = 0.0, max_iter: int = 100):
    """Roots of monotone functions, one per row, all rows at once.

    `fun(x)` returns (f, dfdx) for an array x. Each row must bracket a root: f(lo) and f(hi)
    of opposite sign (or zero). As in Numerical Recipes' rtsafe, a Newton step is taken when
    it stays inside the bracket and is at most half the step before last; otherwise we
    bisect. So it never diverges, and on smooth pieces it converges quadratically. A row stops
    when its bracket or its Newton step falls below xtol * (1 + |x|), or |f| <= ftol.
    """
    lo = np.array(lo, dtype=float, copy=True)
    hi = np.array(hi, dtype=float, copy=True)
    f_lo, _ = fun(lo)
    increasing = f_lo <= 0  # f(lo) <= 0 <= f(hi) for an increasing function
    x = 0.5 * (lo + hi)
    step_before_last = step_last = hi - lo
    for _ in range(max_iter):
        f, df = fun(x)
        below = np.where(increasing, f < 0, f > 0)  # the root lies above x
        lo = np.where(below, x, lo)
        hi = np.where(below, hi, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = x - f / df
        newton_step = np.abs(newton - x)
        good = np.isfinite(newton) & (newton >= lo) & (newton <= hi) & (newton_step <= 0.5 * step_before_last)
        tol = xtol * (1.0 + np.abs(x))
        done = (hi - lo <= tol) | (np.abs(f) <= ftol) | (good & (newton_step <= tol))
        x_next = np.where(good, newton, 0.5 * (lo + hi))
        step_before_last, step_last = step_last, np.abs(x_next - x)
        x = np.where(done, np.where(good, newton, x), x_next)
        if np.all(done):
            break
    return x
