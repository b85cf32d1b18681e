import numpy as np
import pytest
from scipy.special import lambertw

from strategies.allocation.numerics import bracketed_newton, lambert_w0, lambert_wm1


def test_lambert_w0_matches_scipy_over_its_whole_domain():
    z = np.concatenate([np.linspace(-1 / np.e + 1e-6, 0.5, 5000), np.logspace(-200, 200, 5000), np.linspace(0, 10, 500)])
    ours, ref = lambert_w0(z), lambertw(z).real
    assert np.all(np.abs(ours - ref) <= 1e-12 * np.maximum(1.0, np.abs(ref)))
    assert np.all(ours >= -1.0)


def test_lambert_wm1_matches_scipy_over_its_whole_domain():
    z = np.concatenate([np.linspace(-1 / np.e + 1e-6, -1e-12, 5000), -np.logspace(-200, -1, 5000)])
    ours, ref = lambert_wm1(z), lambertw(z, -1).real
    assert np.all(np.abs(ours - ref) <= 1e-12 * np.abs(ref))
    assert np.all(ours <= -1.0)


def test_lambert_w_solves_its_equation_next_to_the_branch_point():
    """There W is ill-conditioned (scipy itself rounds to -1); the defining equation still holds."""
    z = -1 / np.e + np.logspace(-15, -6, 200)
    for w, on_branch in ((lambert_w0(z), lambda w: w >= -1), (lambert_wm1(z), lambda w: w <= -1)):
        assert np.all(np.abs(w * np.exp(w) - z) <= 1e-15)
        assert np.all(on_branch(w))


@pytest.mark.parametrize("increasing", [True, False])
def test_bracketed_newton_finds_each_rows_root(increasing):
    targets = np.array([1.6, 2.0, 50.0, 1e4])  # the first root lies on the clipped piece
    sign = 1.0 if increasing else -1.0
    # a kinked monotone function (clipped pieces), the shape the solvers feed it
    fun = lambda x: (sign * (np.clip(x, 0.5, 20.0) * 3.0 + x ** 3 - targets),  # noqa: E731
                     sign * (np.where((x > 0.5) & (x < 20.0), 3.0, 0.0) + 3 * x ** 2))
    roots = bracketed_newton(fun, np.zeros(4), np.full(4, 100.0), xtol=1e-14)
    assert np.allclose(fun(roots)[0], 0.0, atol=1e-9 * targets.max())
