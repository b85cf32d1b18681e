"""`fedfill scenario` and `fedfill plan` as a user runs them: real processes, exit codes, JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedfill(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "fedfill", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "s.json"
    done = fedfill("scenario", "--preset", "fimi", "--devices", "6", "--seed", "0", "--out", str(path))
    assert done.returncode == 0, done.stderr
    return path


def test_plan_json_follows_the_contract_and_is_reproducible(scenario_file):
    first = fedfill("plan", str(scenario_file), "--json", "--seed", "4")
    second = fedfill("plan", str(scenario_file), "--json", "--seed", "4")
    assert first.returncode == 0, first.stderr
    plan = json.loads(first.stdout)
    assert {"policy", "feasible", "energy_j", "latency_s", "devices"} <= plan.keys()
    assert plan["feasible"] is True and plan["policy"] == "fimi"
    for device in plan["devices"]:
        assert {"id", "d_gen", "f_hz", "b_hz", "p_w", "eta", "bits", "t_cmp_s", "t_com_s", "e_cmp_j", "e_com_j",
                "class_gen"} <= device.keys()
        assert sum(device["class_gen"]) == round(device["d_gen"])
    total = sum(d["e_cmp_j"] + d["e_com_j"] for d in plan["devices"])
    assert plan["energy_j"] == pytest.approx(total, rel=1e-12)
    assert json.loads(second.stdout)["devices"] == plan["devices"]


def test_plan_table_names_every_device(scenario_file):
    done = fedfill("plan", str(scenario_file), "--policy", "tfl")
    assert done.returncode == 0
    scenario = json.loads(scenario_file.read_text())
    assert all(d["id"] in done.stdout for d in scenario["devices"])
    assert "energy" in done.stdout


def test_ondemand_preset_plans_with_bits_from_the_demand():
    scenario = fedfill("scenario", "--preset", "ondemand", "--devices", "4")
    done = fedfill("plan", "-", "--policy", "ondemand", "--json", stdin=scenario.stdout)
    assert done.returncode == 0, done.stderr
    # [ODQ]'s demands (6-8 bits by [ODQ Thm. 1]) cost our codec 1-2 bits more at the prior
    assert all(7 <= d["bits"] <= 10 for d in json.loads(done.stdout)["devices"])


def test_a_demand_beyond_31_bits_exits_2_naming_the_device_and_what_31_bits_can_meet():
    data = json.loads(fedfill("scenario", "--preset", "ondemand", "--devices", "3").stdout)
    data["devices"][1]["quant_error"] = 1e-20
    data["devices"][0]["codec_constant"] = 3.5  # a reported constant is read and kept
    done = fedfill("plan", "-", "--policy", "ondemand", "--json", stdin=json.dumps(data))
    assert done.returncode == 2, done.stderr
    (reason,) = json.loads(done.stdout)["reasons"]
    assert reason["constraint"] == "quantization_error" and reason["devices"] == ["dev0001"]
    assert "smallest demand 31 bits can meet" in reason["message"]
    table = fedfill("plan", "-", "--policy", "fimi+ondemand", stdin=json.dumps(data))
    assert table.returncode == 2 and "quantization_error" in table.stdout and "dev0001" in table.stdout


def test_infeasible_scenario_exits_2_with_the_reason(scenario_file):
    data = json.loads(scenario_file.read_text())
    data["system"]["t_max_s"] = 0.5
    done = fedfill("plan", "-", "--json", stdin=json.dumps(data))
    assert done.returncode == 2
    out = json.loads(done.stdout)
    assert out["feasible"] is False and out["reasons"][0]["constraint"] == "latency"
    table = fedfill("plan", "-", stdin=json.dumps(data))
    assert table.returncode == 2 and "infeasible" in table.stdout


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["devices"][1].pop("gain"), "device 'dev0001': missing field 'gain'"),
    (lambda d: d["devices"][2].__setitem__("f_max_hz", -1e9), "device 'dev0002': field 'f_max_hz' must be positive"),
    (lambda d: d["devices"][0].__setitem__("eps", float("nan")), "device 'dev0000': field 'eps' must be finite"),
    (lambda d: d["system"].pop("zeta"), "system: missing field 'zeta'"),
    (lambda d: d["devices"][3].__setitem__("bits", 40), "device 'dev0003': field 'bits'"),
    (lambda d: d["devices"][4].__setitem__("class_counts", [1, 2]), "device 'dev0004': class_counts sum"),
    (lambda d: d["devices"][1].__setitem__("quant_error", 1.5), "device 'dev0001': field 'quant_error' must be in (0, 1)"),
    (lambda d: d["devices"][2].__setitem__("codec_constant", 0), "device 'dev0002': field 'codec_constant' must be positive"),
])
def test_malformed_scenarios_exit_2_naming_field_and_device(scenario_file, mutate, expected):
    data = json.loads(scenario_file.read_text())
    mutate(data)
    done = fedfill("plan", "-", stdin=json.dumps(data))
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_policy_and_missing_file_exit_2(scenario_file, tmp_path):
    done = fedfill("plan", str(scenario_file), "--policy", "magic")
    assert done.returncode == 2 and "unknown policy 'magic'" in done.stderr
    done = fedfill("plan", str(tmp_path / "nope.json"))
    assert done.returncode == 2 and "cannot read scenario" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "bad.json").write_text("{not json")
    done = fedfill("plan", str(tmp_path / "bad.json"))
    assert done.returncode == 2 and "not valid JSON" in done.stderr


def test_standard_input_that_is_not_usable_json_exits_2_with_the_reason():
    for text, reason in (('{"system": 1', "not valid JSON"), ("[" * 100_000, "nested too deeply")):
        done = fedfill("plan", "-", stdin=text)
        assert done.returncode == 2 and reason in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(scenario_file):
    """`fedfill plan s.json | head -1`: no BrokenPipeError traceback, SIGPIPE's exit status."""
    command = subprocess.Popen([sys.executable, "-m", "fedfill", "plan", str(scenario_file), "--json"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # the reader is gone before the plan is printed
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141
    assert stderr == ""
