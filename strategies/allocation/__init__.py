"""The allocation engine: per-device plans that minimise device energy (pure numpy/scipy).

Nothing here imports Flower or torch. Entry points: `solve_plan(scenario, policy)` and the
scenario helpers; `fedfill plan` and `fedfill scenario` are the command-line faces.
"""

from .learning import LearningModel, fit_learning_model
from .policies import POLICIES, Plan, solve_plan
from .scenario import Devices, Scenario, ScenarioError, System, load_scenario, parse_scenario

__all__ = ["POLICIES", "Devices", "LearningModel", "Plan", "Scenario", "ScenarioError", "System",
           "fit_learning_model", "load_scenario", "parse_scenario", "solve_plan"]
