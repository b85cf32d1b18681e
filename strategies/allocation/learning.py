"""The FIMI learning model delta(D) = alpha * D**(-beta) - gamma ([FIMI eq. 1]).

delta is the local learning error of a device that trains on D samples. [FIMI] fits
alpha, beta, gamma on a public proxy task and prints no numbers, so we fit our own from
measured (samples, error) points and store the fit as JSON next to its residuals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LearningModel:
    alpha: float
    beta: float
    gamma: float
    # Provenance of a fitted model: the points it came from and how far each one is off.
    samples: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    source: str = ""

    def error(self, d: np.ndarray | float) -> np.ndarray:
        return self.alpha * np.asarray(d, dtype=float) ** (-self.beta) - self.gamma

    def samples_for_error(self, delta: np.ndarray | float) -> np.ndarray:
        """Inverse of `error` ([FIMI eq. 19] without the -D_loc): samples needed for error delta."""
        return ((np.asarray(delta, dtype=float) + self.gamma) / self.alpha) ** (-1.0 / self.beta)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "LearningModel":
        """From a fit JSON: a path, or a packaged resource (anything with `read_text`)."""
        source = path if hasattr(path, "read_text") else Path(path)
        return cls(**json.loads(source.read_text()))


def shipped_fit(dataset: str) -> LearningModel | None:
    """The fit we ship for a dataset (`fedfill fit-learning` made it), or None.

    Read as package data, so it is found in an installed fedfill as in a source tree.
    """
    resource = resources.files(__package__) / "learning_fits" / f"{dataset.lower()}.json"
    return LearningModel.load(resource) if resource.is_file() else None


def _power_law(d: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    return alpha * d ** (-beta) - gamma


def fit_learning_model(samples, errors, source: str = "") -> LearningModel:
    """Least-squares fit of the power law with alpha, beta, gamma >= 0 ([FIMI]'s signs).

    Needs at least four distinct sample counts: three parameters and one degree of freedom
    left to say something about the fit.
    """
    from scipy.optimize import curve_fit  # 0.8 s to import: only the fit needs it

    d = np.asarray(samples, dtype=float)
    e = np.asarray(errors, dtype=float)
    if d.shape != e.shape or d.ndim != 1:
        raise ValueError("samples and errors must be 1-D arrays of equal length")
    if len(np.unique(d)) < 4:
        raise ValueError(f"need at least 4 distinct sample counts to fit 3 parameters, got {len(np.unique(d))}")
    if np.any(d <= 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(e)):
        raise ValueError("sample counts must be positive and errors finite")
    # Start from a pure power law through the end points (gamma = 0).
    beta0 = max(1e-3, np.log(max(e[0], 1e-6) / max(e[-1], 1e-6)) / np.log(d[-1] / d[0])) if d[-1] != d[0] else 0.5
    alpha0 = max(e[0], 1e-6) * d[0] ** beta0
    params, _ = curve_fit(_power_law, d, e, p0=[alpha0, beta0, 0.0],
                          bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, np.inf]), maxfev=20000)
    alpha, beta, gamma = (float(p) for p in params)
    residuals = e - _power_law(d, alpha, beta, gamma)
    return LearningModel(alpha, beta, gamma, d.tolist(), e.tolist(), residuals.tolist(), source)
