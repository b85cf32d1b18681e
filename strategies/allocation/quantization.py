"""On-demand quantization ([ODQ]): bits from an error demand, and each device's time split.

Bits from a demand. A device tolerates a relative error q: E||u - Q(u)||^2 <= q ||u||^2 for
its update u. Two rules turn q into a bit width (one sign bit, bits - 1 bits of level index,
so L = 2**(bits - 1) magnitude levels):

- `theorem1_bits_for_error`: [ODQ Thm. 1] bounds the error by ||u||^2 / (2 L^2), so
  L* = sqrt(1/(2q)) levels and bits = 1 + ceil(log2 L*). It does NOT hold for our codec
  (fedfill/codec.py): the codec spaces its levels s = (hi - lo)/(L - 1) with hi = max |u| per
  tensor, not by ||u||, and on Gaussian-like updates its error is about 9x that bound.
- `codec_bits_for_error` (the planner's default): the model of our codec. Stochastic rounding
  between neighbours a < |x| < a + s has variance (a + s - |x|)(|x| - a), on average s^2/6
  for values spread evenly inside the interval, so

      E||u - Q(u)||^2 / ||u||^2  ~=  K / (L - 1)^2,   K = sum_t n_t (hi_t - lo_t)^2 / (6 ||u||^2)

  with the per-update "codec constant" K (tensors t of n_t elements). A device measures K
  exactly on its update (`fedfill.codec.codec_constant`) and reports it; before any report
  the planner uses `prior_codec_constant(M)`, derived for Gaussian updates.

The time split: with theta of T_max computing and pi = 1 - theta uploading over its band b,
E(theta) = eps (tau omega D)^3 / (theta T)^2 + pi T (b N0/g)(2^(a/pi) - 1), a = S/(b T).
[ODQ eqs. 13, 15, 16 and 18] drop the factor pi and the 2^(a/pi) of the derivative;
from this E both parts fall as their share grows and E is convex in theta, so the optimum is
the root of dE/dtheta on [theta_min, 1 - pi_min] (f <= f_max, P <= P_max).
"""

from __future__ import annotations

import numpy as np

from .costs import LN2
from .numerics import bracketed_newton


MAX_QUANTIZED_BITS = 31  # 32 bits sends raw float32: no quantization, no level grid
BITS_RULES = ("codec", "theorem1")


def levels_for_error(relative_error) -> np.ndarray:
    """[ODQ Thm. 1]'s levels L* = sqrt(1/(2q))."""
    return np.sqrt(1.0 / (2.0 * np.asarray(relative_error, dtype=float)))


def theorem1_bits_for_error(relative_error) -> np.ndarray:
    """[ODQ]'s rule: fewest bits whose L = 2**(bits-1) levels meet the demand under [ODQ Thm. 1]
    (1/(2 L^2) <= q); 32 (no quantization) where more than 31 bits would be needed.

    Kept for comparison: our codec does not deliver [ODQ Thm. 1]'s error (module docstring).
    """
    levels = np.maximum(levels_for_error(relative_error), 1.0)
    return np.minimum(1 + np.ceil(np.log2(levels) - 1e-12).astype(int), 32).clip(2, 32)


bits_for_error = theorem1_bits_for_error  # the old name, same rule


def codec_relative_error(bits, codec_constant) -> np.ndarray:
    """The codec model's relative error K / (L - 1)^2 at `bits` (2..31), L = 2**(bits - 1)."""
    levels = np.exp2(np.asarray(bits, dtype=float) - 1.0)
    return np.asarray(codec_constant, dtype=float) / (levels - 1.0) ** 2


def codec_bits_for_error(relative_error, codec_constant) -> np.ndarray:
    """Fewest bits in 2..31 whose modeled error K / (2**(bits-1) - 1)^2 meets the demand q.

    Vectorized over both arguments (broadcast). Where no width up to 31 bits meets q (q below
    `smallest_demand(K)`) the answer is 32, which here means "no quantized width": the
    planner reports such a device as infeasible instead of sending it raw floats unasked.
    """
    q = np.asarray(relative_error, dtype=float)
    k = np.asarray(codec_constant, dtype=float)
    if np.any(~(q > 0)) or np.any(~(k > 0)) or np.any(~np.isfinite(k)):
        raise ValueError("relative_error and codec_constant must be positive (and the constant finite)")
    # K/(L-1)^2 <= q  <=>  L >= 1 + sqrt(K/q)  <=>  bits >= 1 + log2(1 + sqrt(K/q))
    bits = 1 + np.ceil(np.log2(1.0 + np.sqrt(k / q)) - 1e-12)
    bits = np.clip(bits, 2, 32).astype(int)
    # The closed form can land one off where log2 rounds across an integer: settle it exactly.
    meets_below = (bits > 2) & (bits <= 32) & (codec_relative_error(np.maximum(bits - 1, 2), k) <= q)
    bits = np.where(meets_below, bits - 1, bits)
    misses = (bits <= MAX_QUANTIZED_BITS) & (codec_relative_error(np.minimum(bits, 31), k) > q)
    bits = np.where(misses, bits + 1, bits)
    return np.minimum(bits, 32)


def prior_codec_constant(model_params) -> float:
    """The codec constant K to plan with before a device has reported one: ln(2 M) / 3.

    Derivation, for an update whose tensor t holds n_t i.i.d. N(0, sigma_t^2) values:
    ||u||^2 ~= sum_t n_t sigma_t^2, lo_t ~= 0 (some element is nearly 0), and the largest
    of n Gaussian magnitudes satisfies E max|u| <= sigma sqrt(2 ln(2n)) (it is about
    sigma sqrt(2 ln n) for large n; the 2n bound is the conservative form, exceeded with
    probability about 1/(sqrt(2 pi) sqrt(2 ln 2n)), under 8% for n >= 1e4, and then only
    by a fraction of a sigma). So hi_t^2 ~= 2 sigma_t^2 ln(2 n_t) and

        K = sum_t n_t hi_t^2 / (6 ||u||^2) ~= sum_t n_t sigma_t^2 ln(2 n_t) / (3 sum_t n_t sigma_t^2)
          <= ln(2 max_t n_t) / 3 <= ln(2 M) / 3,

    a weighted mean of ln(2 n_t)/3 bounded by the case of one tensor holding all M
    parameters. The server knows M but not the tensor sizes or sigmas, so it takes the bound:
    conservative, since a device whose real error misses the demand can only raise its bits
    (and pay more than planned). Values: 5.3 for VGG-9 (3.5M), 6.0 for [ODQ]'s M = 37M,
    against [ODQ Thm. 1]'s implied K = (L-1)^2/(2 L^2) ~= 0.5.

    Real updates need not be Gaussian, and the prior is a Gaussian figure: `bench/bench_codec.py
    --demands` measured K = 14-15 on the digits VGG-9's SGD updates (max |u| / rms up to 15 in
    a conv layer against sqrt(2 ln 2n) = 4.7; prior 4.1: round-1 plans one bit short, err/q up
    to 3.2) and K = 0.6-0.7 on the digits UNet's AdamW updates (near-uniform magnitudes; the
    prior spends 2-3 bits too many). Hence the report: a device's measured constant replaces
    the prior from its next plan, and a device raises its bits where the plan falls short
    (fedfill.codec.bits_for_demand).
    """
    m = float(model_params)
    if not (m >= 1 and np.isfinite(m)):
        raise ValueError(f"model_params must be a finite count of at least 1, got {model_params!r}")
    return float(np.log(2.0 * m) / 3.0)


def planned_bits(relative_error, codec_constant, rule: str = "codec") -> np.ndarray:
    """Bits per device under `rule`: "codec" (our codec's model with constant K, the default)
    or "theorem1" ([ODQ Thm. 1], which ignores K). 32 where no width up to 31 bits
    meets the demand."""
    if rule == "codec":
        return codec_bits_for_error(relative_error, codec_constant)
    if rule == "theorem1":  # its 32 means exactly "more than 31 bits" (L* > 2**30)
        return theorem1_bits_for_error(relative_error)
    raise ValueError(f"unknown bits rule {rule!r}; choose one of {', '.join(BITS_RULES)}")


def smallest_demand(codec_constant, rule: str = "codec") -> np.ndarray:
    """The smallest demand that 31 bits meets under `rule` (K / (2**30 - 1)^2, or 1/(2 * 4**30))."""
    if rule == "theorem1":
        return np.full(np.shape(codec_constant), 1.0 / (2.0 * 4.0 ** (MAX_QUANTIZED_BITS - 1)))
    return codec_relative_error(MAX_QUANTIZED_BITS, codec_constant)


def split_bounds(work_cycles, f_max, s_bits, b, gain, p_max, noise_w_per_hz, t_max):
    """theta_min (train at f_max) and pi_min (upload at P_max over b), [ODQ eq. 12]."""
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
