import numpy as np
import pytest

from strategies.allocation.learning import LearningModel, fit_learning_model


def test_fit_recovers_a_known_power_law_from_noisy_points():
    d = np.array([25, 50, 100, 200, 400, 800, 1600], dtype=float)
    truth = LearningModel(alpha=3.0, beta=0.35, gamma=0.1)
    noisy = truth.error(d) + np.random.default_rng(0).normal(0, 0.002, d.size)
    fit = fit_learning_model(d, noisy, source="synthetic")
    assert fit.alpha == pytest.approx(3.0, rel=0.1) and fit.beta == pytest.approx(0.35, rel=0.1)
    assert np.max(np.abs(fit.error(d) - truth.error(d))) < 0.005
    assert np.allclose(fit.residuals, noisy - fit.error(d))


def test_samples_for_error_inverts_error():
    model = LearningModel(alpha=4.0, beta=0.25, gamma=0.2)
    d = np.array([10.0, 1250.0, 1e5])
    assert np.allclose(model.samples_for_error(model.error(d)), d)


def test_fit_round_trips_through_json(tmp_path):
    fit = fit_learning_model([10, 20, 40, 80, 160], [0.8, 0.6, 0.45, 0.35, 0.3])
    fit.save(tmp_path / "fit.json")
    assert LearningModel.load(tmp_path / "fit.json") == fit


@pytest.mark.parametrize("samples,errors,message", [
    ([10, 20, 40], [0.5, 0.4, 0.3], "at least 4 distinct"),
    ([10, 20, 40, -80], [0.5, 0.4, 0.3, 0.2], "positive"),
    ([10, 20, 40, 80], [0.5, np.nan, 0.3, 0.2], "finite"),
])
def test_fit_rejects_points_it_cannot_fit(samples, errors, message):
    with pytest.raises(ValueError, match=message):
        fit_learning_model(samples, errors)
