"""The device cost model of both papers, [FIMI] and [ODQ] (design.md §4), vectorized over devices.

Compute: a device that trains tau epochs on D samples at omega cycles each, at frequency f,
takes T = tau*omega*D/f seconds and spends E = eps*tau*omega*D*f**2 joules
([FIMI eqs. 5-6]). Uplink: FDMA share b Hz at power P gives r = b*log2(1 + g*P/(N0*b))
([FIMI eq. 7]); an update of S bits takes S/r seconds and P*S/r joules ([FIMI eqs. 8-9]).
"""

from __future__ import annotations

import numpy as np

LN2 = np.log(2.0)


def update_bits(model_params, bits) -> np.ndarray:
    """S_i: bits one upload carries; `bits` per element, 32 meaning a raw float32 update."""
    return np.asarray(model_params, dtype=float) * np.asarray(bits, dtype=float)


def compute_time(tau, omega, samples, f):
    return tau * omega * samples / f


def compute_energy(eps, tau, omega, samples, f):
    return tau * eps * omega * samples * f ** 2


def uplink_rate(b, p, gain, noise_w_per_hz):
    return b * np.log2(1.0 + gain * p / (noise_w_per_hz * b))


def power_for_upload(b, t, s_bits, gain, noise_w_per_hz):
    """Transmit power that sends s_bits in t seconds over b Hz (inverse of [FIMI eq. 7], [FIMI eq. 30])."""
    return noise_w_per_hz * b / gain * np.expm1(LN2 * s_bits / (b * t))


def upload_energy(b, t, s_bits, gain, noise_w_per_hz):
    return power_for_upload(b, t, s_bits, gain, noise_w_per_hz) * t
