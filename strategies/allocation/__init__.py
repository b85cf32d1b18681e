"""The allocation engine: per-device plans that minimise device energy (pure numpy/scipy).

Nothing here imports Flower or torch. Entry points: `solve_plan(scenario, policy)` and the
scenario helpers; `fedfill plan` and `fedfill scenario` are the command-line faces.

The names below load their module on first use, so that a device importing one numpy leaf
(the request rule in `augmentation`, the drawn profiles in `presets`) does not load the solvers.
"""

import importlib

_HOMES = {
    "LearningModel": "learning", "fit_learning_model": "learning",
    "POLICIES": "policies", "Plan": "policies", "solve_plan": "policies",
    "Devices": "scenario", "Scenario": "scenario", "ScenarioError": "scenario", "System": "scenario",
    "load_scenario": "scenario", "parse_scenario": "scenario", "check_device_profile": "scenario",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
