"""Extreme but finite numbers (1e308, 5e-324, values that overflow only in a product or a
power) in a scenario or a profile: a plan with finite figures or an error naming the field,
never an OverflowError from deep in a solver."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from strategies.allocation.policies import POLICIES, solve_plan
from strategies.allocation.presets import fimi_scenario
from strategies.allocation.scenario import _DEVICE_RULES, _SYSTEM_RULES, ScenarioError, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
EXTREMES = [1e308, -1e308, 5e-324, 1e-300, 1e200, 1e155, 1e103, 1e-155]


def base() -> dict:
    scenario = fimi_scenario(3, 0).to_json()
    for device in scenario["devices"]:
        device.pop("class_counts", None)
    return scenario


def variants():
    """Each field at each extreme, each field at both ends of its range for every device, and
    every field at once at its lower or upper end."""
    for part, rules in (("system", _SYSTEM_RULES), ("devices", _DEVICE_RULES)):
        for name, (positive, (low, high)) in rules.items():
            for value in EXTREMES + [low, high]:
                if value == 0 and positive:
                    continue
                scenario = base()
                if part == "system":
                    scenario["system"][name] = 0.5 if name == "delta_max" and value >= 1 else value
                else:
                    for device in scenario["devices"]:
                        device[name] = value
                yield f"{part}.{name}={value:g}", scenario
    for end in (0, 1):
        scenario = base()
        for name, (positive, bounds) in _SYSTEM_RULES.items():
            if not (bounds[end] == 0 and positive):
                scenario["system"][name] = 0.5 if name == "delta_max" else bounds[end]
        for device in scenario["devices"]:
            device.update({name: bounds[end] for name, (_, bounds) in _DEVICE_RULES.items()})
        yield f"every field at its {'upper' if end else 'lower'} end", scenario


def test_every_field_at_its_extremes_plans_or_names_the_field():
    planned = refused = 0
    for label, data in variants():
        try:
            scenario = parse_scenario(data)
        except ScenarioError as err:
            assert any(name in str(err) for name in (*_SYSTEM_RULES, *_DEVICE_RULES)), (label, err)
            refused += 1
            continue
        for policy in POLICIES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a solver's inf on a rejected candidate
                plan = solve_plan(scenario, policy)
            figures = plan.to_json()
            json.dumps(figures, allow_nan=False)  # no NaN or inf reaches a plan file
            planned += 1
    assert planned > 100 and refused > 50


def test_a_power_out_of_float_range_is_refused_naming_both_fields():
    scenario = base()
    scenario["system"].update(alpha=1e5, beta=0.01)  # alpha^(3/beta) = 1e1500
    with pytest.raises(ScenarioError, match=r"system.alpha and system.beta: alpha\^\(3/beta\) = 10\^1500"):
        parse_scenario(scenario)


def test_fedfill_plan_refuses_a_finite_but_absurd_alpha(tmp_path):
    scenario = base()
    scenario["system"]["alpha"] = 1e308
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    done = subprocess.run([sys.executable, "-m", "fedfill", "plan", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "system.alpha must be in [1e-12, 1e+06], got 1e+308" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_server_sits_out_a_profile_the_planner_would_refuse():
    from flwr.app import ConfigRecord, RecordDict

    from fedfill import contract
    from server.app import accept_profile

    good = {"d_loc": 100.0, "f_max_hz": 1e9, "eps": 1e-28, "p_max_w": 0.2, "gain": 1e-10}
    assert accept_profile(RecordDict({contract.PROFILE_KEY: ConfigRecord(good)}))["gain"] == 1e-10
    with pytest.raises(contract.ReplyError, match=r"profile field 'gain' must be in \[1e-30, 1000\], got 1e\+200"):
        accept_profile(RecordDict({contract.PROFILE_KEY: ConfigRecord({**good, "gain": 1e200})}))


@pytest.mark.parametrize("setting, value", [("t_max_s", 1e308), ("t_max_s", 5e-324), ("local_epochs", 10**12)])
def test_a_run_setting_the_planner_would_refuse_is_refused_before_the_run(setting, value):
    from dataclasses import replace

    from commands.checks import check_settings
    from fedfill.config import RunConfig
    from fedfill.errors import UsageError

    with pytest.raises(UsageError, match="must be"):
        check_settings(replace(RunConfig(), **{setting: value}))
