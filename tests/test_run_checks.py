"""A run's configuration is refused before anything starts (commands.checks, issue 13 item 6).

Each bad input goes through `fedfill.cli.main` in this process, as a user types it: exit 2,
a message naming the option, the value and what would work, no report directory made (the
launcher makes it before it starts Ray, the SuperLink or the generation service) and back
within seconds where a started run would take minutes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from fedfill.cli import main
from fedfill.config import RunConfig

SECONDS = 10.0  # a refused run's budget, imports aside (a started one takes minutes)


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Pay the heavy imports (scikit-learn's digits, torch for the model's size, Flower for
    the strategy, diffusers for the ddpm job) once, so that the timings below measure the
    checks themselves."""
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401
    from diffusers import UNet2DModel  # noqa: F401

    import jobs.ddpm  # noqa: F401
    import generation.pipeline  # noqa: F401
    import server.app  # noqa: F401


@pytest.fixture
def files(tmp_path):
    """Bad files a user may name: text, JSON of another kind, a scenario of 3 devices."""
    (tmp_path / "notes.txt").write_text("not json at all\n")
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "nan_fit.json").write_text('{"alpha": NaN, "beta": 0.25, "gamma": 0.2}')
    (tmp_path / "empty").mkdir()
    assert main(["scenario", "--devices", "3", "--out", str(tmp_path / "three.json")]) == 0
    return tmp_path


def refused(argv: list[str], capsys, out: Path) -> tuple[str, float]:
    """Run the command; assert it exits 2 fast with no report directory; return its message."""
    capsys.readouterr()
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    printed = capsys.readouterr()
    assert code == 2, printed
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert not out.exists(), "the report directory was made: the run got past its checks"
    assert "generation service up" not in printed.out and " engine -> " not in printed.out
    return printed.err, seconds


RUN = ["run", "--rounds", "1", "--nodes", "2", "--generator", "none"]

# (extra flags, what the message must say); {d} is the test's file directory
RUN_CASES = [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--alpha", "0"], "--alpha 0.0: must be a positive number"),
    (["--alpha", "nan"], "--alpha nan: must be a positive number"),
    (["--alpha", "-1"], "--alpha -1.0: must be a positive number"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--local-epochs", "0"], "--local-epochs 0: must be at least 1"),
    (["--lr", "nan"], "--lr nan: must be a positive finite number"),
    (["--lr", "0"], "--lr 0.0: must be a positive finite number"),
    (["--lr", "inf"], "--lr inf: must be a positive finite number"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--t-max", "0"], "--t-max 0.0: must be in [1e-06, 1e+07] seconds"),
    (["--t-max", "nan"], "--t-max nan: must be in [1e-06, 1e+07] seconds"),
    (["--t-max", "1e308"], "--t-max 1e+308: must be in [1e-06, 1e+07] seconds"),
    (["--synthetic-fraction", "-0.5"], "--synthetic-fraction -0.5: must be 0 or a positive number"),
    (["--generator-steps", "0"], "--generator-steps 0: must be in 1..1000"),
    (["--generator-steps", "5000"], "--generator-steps 5000: must be in 1..1000"),
    (["--generator-guidance", "nan"], "--generator-guidance nan: must be in [0, 20]"),
    (["--generator-guidance", "50"], "--generator-guidance 50.0: must be in [0, 20]"),
    (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--node-wait-s", "-1"], "--node-wait-s -1.0: must be 0 or a positive number"),
    (["--reply-timeout-s", "0"], "--reply-timeout-s 0.0: must be a positive number"),
    (["--aggregation", "mean"], "unknown aggregation 'mean': choose one of fedavg, median, trimmed-mean"),
    (["--aggregation", "trimmed-mean", "--trim-beta", "0.5"], "trim-beta 0.5 is outside [0, 0.5)"),
    (["--norm-bound", "nan"], "norm-bound nan must be 0 (no norm screening) or positive"),
    (["--learning-fit", "{d}/missing.json"], "--learning-fit {d}/missing.json: no such file"),
    (["--learning-fit", "{d}/notes.txt"], "--learning-fit {d}/notes.txt: not a learning-model fit JSON"),
    (["--learning-fit", "{d}/other.json"], "--learning-fit {d}/other.json: not a learning-model fit JSON"),
    (["--learning-fit", "{d}/nan_fit.json"], "the power law needs finite numbers"),
    (["--dataset", "mnist"], "--dataset mnist: unknown dataset 'mnist'"),
    (["--dataset", "cifar10"], "--dataset cifar10: dataset 'cifar10' is read from a local directory"),
    (["--dataset", "cifar10", "--data-dir", "{d}/nowhere"], "{d}/nowhere: no such directory"),
    (["--dataset", "cifar10", "--data-dir", "{d}/empty"], "missing; expected CIFAR-10 python batches"),
    (["--data-dir", "{d}/empty"], "--data-dir {d}/empty: digits is embedded and reads no directory"),
    (["--nodes", "100"], "--nodes 100: the Dirichlet split refuses it"),
    (["--nodes", "100"], "--dataset synthetic-digits draws 50 training images a device"),
    (["--fraction", "0"], "--fraction 0.0: must be in (0, 1]"),
    (["--fraction", "1.5"], "--fraction 1.5: must be in (0, 1]"),
    (["--fraction", "nan"], "--fraction nan: must be in (0, 1]"),
    (["--min-nodes", "3"], "--min-nodes 3: must be in 1..2: a round cannot sample more than the 2 nodes"),
    (["--min-nodes", "0"], "--min-nodes 0: must be in 1..2"),
    (["--dataset", "synthetic-digits", "--job", "ddpm"], "--dataset synthetic-digits --job ddpm: the ddpm job"),
    (["--dataset", "synthetic-digits", "--data-dir", "{d}/empty"], "synthetic-digits is embedded and reads no"),
    (["--nodes", "10", "--t-max", "0.01"], "--t-max 0.01: the fimi plan of round 1 leaves every one of the 10 devices out"),
    (["--job", "ddpm", "--eval-per-class", "0"], "--eval-per-class must be at least 2"),
    (["--job", "ddpm", "--start-checkpoint", "{d}/empty"], "{d}/empty"),
    # the launcher's own options
    (["--scenario", "{d}/three.json"], "--scenario {d}/three.json: it profiles the SuperNodes the deployment engine"),
    (["--engine", "deployment", "--scenario", "{d}/three.json"], "has 3 devices but --nodes is 2"),
    (["--engine", "deployment", "--scenario", "{d}/missing.json"], "{d}/missing.json"),
    (["--engine", "deployment", "--nodes", "3", "--scenario", "{d}/notes.txt"], "{d}/notes.txt"),
    (["--root-certificates", "{d}/ca.pem"], "--root-certificates goes with --superlink"),
    (["--superlink", "127.0.0.1:9093", "--root-certificates", "{d}/ca.pem"], "--root-certificates {d}/ca.pem: no such file"),
    (["--superlink", "localhost"], "--superlink localhost: expected HOST:PORT"),
    (["--superlink", "localhost:9093", "--generator", "auto"], "with --superlink, name the generation service"),
    (["--generator", "localhost:99999"], "--generator localhost:99999: expected auto, none or HOST:PORT"),
    (["--timeout", "0"], "--timeout 0.0: must be a positive number of seconds"),
    (["--timeout", "nan"], "--timeout nan: must be a positive number of seconds"),
    (["--resume"], "nothing to resume"),
]


@pytest.mark.parametrize("flags, message", RUN_CASES, ids=[" ".join(flags) for flags, _ in RUN_CASES])
def test_a_bad_run_is_refused_before_anything_starts(flags, message, files, capsys):
    out = files / "report"
    argv = [*RUN, *(flag.format(d=files) for flag in flags), "--out", str(out)]
    if "--resume" in flags:  # the one case where the report directory may exist: it holds no checkpoint
        out = files / "report-that-is-not-made"
        argv[-1] = str(files)
    err, _ = refused(argv, capsys, out)
    assert message.format(d=files) in err
    assert err.startswith("fedfill run: ") and "Traceback" not in err


def test_a_report_directory_where_a_file_is(files, capsys):
    (files / "afile").write_text("")
    for out in (files / "afile", files / "afile" / "below"):
        err, _ = refused([*RUN, "--out", str(out)], capsys, files / "never")
        assert f"{files / 'afile'} is a file; the report needs a directory" in err


def test_too_many_nodes_for_digits_names_the_largest_count_the_partitioner_takes(files, capsys):
    """The issue's case: `fedfill run --nodes 100` on digits. The count named is the
    partitioner's own answer: it takes that many nodes and refuses one more."""
    err, _ = refused([*RUN[:-4], "--nodes", "100", "--out", str(files / "report")], capsys, files / "report")
    largest = int(re.search(r"at most --nodes (\d+) works with --alpha 0.3 and --seed 0", err).group(1))
    assert largest == 98  # 988 samples in digits' clients' pool, at least 10 each
    from commands.checks import check_split

    assert len(check_split(RunConfig(num_partitions=largest))) == largest
    with pytest.raises(Exception, match="at most --nodes 98"):
        check_split(RunConfig(num_partitions=largest + 1))


def test_a_budget_too_small_for_any_plan_names_one_that_plans_every_device(files, capsys):
    err, _ = refused([*RUN, "--nodes", "10", "--t-max", "0.01", "--out", str(files / "report")], capsys,
                     files / "report")
    smallest = float(re.search(r"--t-max ([\d.e+-]+) or more plans every device", err).group(1))
    from commands.checks import check_job

    check_job(RunConfig(num_partitions=10, t_max_s=smallest))  # the budget named is accepted
    assert "latency" in err  # the planner's reason goes along


def test_compare_checks_every_policy_before_the_first_run(files, capsys):
    out = files / "compare"
    err, _ = refused(["compare", "--rounds", "1", "--nodes", "100", "--generator", "none", "--out", str(out)],
                     capsys, out)
    assert "at most --nodes 98" in err
    err, _ = refused(["compare", "--policies", "fimi,tfl,fimi", "--out", str(out)], capsys, out)
    assert "a policy named twice" in err
    err, _ = refused(["compare", "--target", "nan", "--out", str(out)], capsys, out)
    assert "--target is a accuracy in (0, 1], got nan" in err


UP_CASES = [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--seed", "-3"], "--seed -3: must be 0 or more"),
    (["--port", "70000"], "--port 70000: must be in 1..65535"),
    (["--memory", "1q"], "--memory 1q: The specified value for memory (1q) should specify the units"),
    (["--memory", "1k"], "--memory 1k: Docker's smallest memory limit is 6m"),
    (["--nodes", "3", "--scenario", "{d}/missing.json"], "{d}/missing.json"),
    (["--nodes", "2", "--scenario", "{d}/three.json"], "has 3 devices but --nodes is 2"),
    (["--runs-dir", "{d}/notes.txt"], "{d}/notes.txt is a file"),
]


@pytest.mark.parametrize("flags, message", UP_CASES, ids=[" ".join(flags) for flags, _ in UP_CASES])
def test_testbed_up_refuses_before_any_container(flags, message, files, capsys):
    pytest.importorskip("docker")
    err, _ = refused(["testbed", "--name", "never-up", "up", *(f.format(d=files) for f in flags)], capsys,
                     files / "report")
    assert message.format(d=files) in err


TESTBED_RUN_CASES = [
    (["--uplink-scale", "nan"], "--uplink-scale nan: must be a positive number"),
    (["--uplink-scale", "0"], "--uplink-scale 0.0: must be a positive number"),
    (["--timeout", "-1"], "--timeout -1.0: must be a positive number of seconds"),
    (["--lr", "nan"], "--lr nan: must be a positive finite number"),
    (["--aggregation", "mode"], "unknown aggregation 'mode'"),
]


@pytest.mark.parametrize("flags, message", TESTBED_RUN_CASES, ids=[" ".join(f) for f, _ in TESTBED_RUN_CASES])
def test_testbed_run_refuses_bad_settings_without_touching_docker(flags, message, files, capsys):
    err, _ = refused(["testbed", "--name", "never-up", "run", "--rounds", "1", *flags], capsys, files / "report")
    assert message in err


def test_testbed_run_checks_the_split_for_the_testbeds_node_count(files, capsys, monkeypatch):
    """A testbed of 100 nodes on digits: refused before any container is started or asked
    (the Docker client is a stand-in that fails on any use)."""
    import deploy.testbed as testbed

    monkeypatch.setenv("XDG_STATE_HOME", str(files / "state"))
    monkeypatch.setattr(testbed, "docker_client", lambda: object())
    state = testbed.TestbedState("big", "fedfill:latest", 9000, str(files / "runs"), "big-net", "1g", False,
                                 [testbed.NodeState(k, f"big-node-{k}", {"partition-id": k, "num-partitions": 100}, 1.0)
                                  for k in range(100)])
    state_file = testbed.state_root() / "big" / "testbed.json"
    state_file.parent.mkdir(parents=True)
    state.save(state_file)
    err, _ = refused(["testbed", "--name", "big", "run", "--rounds", "1"], capsys, files / "runs")
    assert "--nodes 100: the Dirichlet split refuses it" in err and "at most --nodes 98" in err


def test_compare_resume_continues_the_policies_it_stopped_in_and_starts_those_it_never_reached(tmp_path):
    import argparse

    from commands.compare import policy_run_args

    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "checkpoint.npz").write_bytes(b"")  # a run that saved a round
    args = argparse.Namespace(resume=True, policy="ondemand", out=str(tmp_path))
    assert policy_run_args(args, "fp32", tmp_path).resume is True
    assert policy_run_args(args, "fixed-8", tmp_path).resume is False  # never started: starts afresh
    assert policy_run_args(argparse.Namespace(resume=False), "fp32", tmp_path).resume is False
