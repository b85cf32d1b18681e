"""On-demand quantization (seed 000): bits from an error demand, and each device's time split.

Theorem 1 bounds the quantization error by delta/(2 L^2) for L levels, so a device that
tolerates a mean-square error q relative to its update's squared norm needs L* = sqrt(1/(2q))
levels. The codec spends one bit on the sign and the rest on the level index, so
bits = 1 + ceil(log2 L*).

The time split: with theta of T_max computing and pi = 1 - theta uploading over its band b,
E(theta) = eps (tau omega D)^3 / (theta T)^2 + pi T (b N0/g)(2^(a/pi) - 1), a = S/(b T).
The paper's eqs. 13, 15, 16 and 18 drop the factor pi and the 2^(a/pi) of the derivative;
from this E both parts fall as their share grows and E is convex in theta, so the optimum is
the root of dE/dtheta on [theta_min, 1 - pi_min] (f <= f_max, P <= P_max).
"""

from __future__ import annotations

import numpy as np

from .costs import LN2
from .numerics import bracketed_newton


def levels_for_error(relative_error) -> np.ndarray:
    return np.sqrt(1.0 / (2.0 * np.asarray(relative_error, dtype=float)))


def bits_for_error(relative_error) -> np.ndarray:
    """Fewest codec bits whose levels meet the demand; 32 (no quantization) is the ceiling."""
    levels = np.maximum(levels_for_error(relative_error), 1.0)
    return np.minimum(1 + np.ceil(np.log2(levels) - 1e-12).astype(int), 32).clip(2, 32)


def split_bounds(work_cycles, f_max, s_bits, b, gain, p_max, noise_w_per_hz, t_max):
    """theta_min (train at f_max) and pi_min (upload at P_max over b), eq. 12."""
    theta_min = work_cycles / (f_max * t_max)
    pi_min = s_bits / (t_max * b * np.log2(1.0 + gain * p_max / (noise_w_per_hz * b)))
    return theta_min, pi_min


def optimal_time_split(eps, work_cycles, s_bits, b, gain, noise_w_per_hz, t_max, theta_min, pi_min):
    """Energy-optimal theta per device (call only where theta_min + pi_min <= 1)."""
    cmp_coef, com_coef, a, lo, hi = np.broadcast_arrays(
        eps * work_cycles ** 3 / t_max ** 2,  # E_cmp = cmp_coef / theta^2
        b * noise_w_per_hz * t_max / gain,  # E_com = com_coef * pi * (2^(a/pi) - 1)
        s_bits / (b * t_max), theta_min, 1.0 - pi_min)

    def marginal(theta, rows=slice(None)):
        pi = 1.0 - theta
        y = a[rows] / pi
        two_y = np.exp2(np.minimum(y, 1000.0))
        value = -2.0 * cmp_coef[rows] / theta ** 3 - com_coef[rows] * (two_y * (1.0 - y * LN2) - 1.0)
        slope = 6.0 * cmp_coef[rows] / theta ** 4 + com_coef[rows] * two_y * (y * LN2) ** 2 / pi
        return value, slope

    theta = np.where(marginal(lo)[0] >= 0, lo, hi)  # a bound is optimal unless the slope changes sign
    interior = np.flatnonzero((marginal(lo)[0] < 0) & (marginal(hi)[0] > 0))
    if interior.size:
        theta[interior] = bracketed_newton(lambda t: marginal(t, interior), lo[interior], hi[interior], xtol=1e-14)
    return theta
