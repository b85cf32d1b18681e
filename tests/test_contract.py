"""The message contract and the run-config schema: what one side writes, the other reads back."""

import argparse
from dataclasses import fields, replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedfill import contract
from fedfill.codec import decode, encode
from fedfill.config import DATASET_DEFAULTS, GIVEN, JOB_DEFAULTS, RunConfig, add_flags
from strategies.allocation import parse_scenario, solve_plan
from strategies.allocation.presets import drawn_device_profile, fimi_scenario


def test_a_plan_entry_reaches_the_device_unchanged():
    plan = solve_plan(fimi_scenario(3, 0), "fimi")
    entry = plan.to_json()["devices"][1]
    sent = contract.NodePlan.from_plan_entry(entry, server_round=4, policy="fimi")
    content = contract.train_message_content(ArrayRecord([np.zeros(2, np.float32)]), sent,
                                             ConfigRecord({"local-epochs": 1}))
    received = contract.NodePlan.from_config(content[contract.CONFIG_KEY])
    assert received == sent
    assert received.d_gen == round(entry["d_gen"]) and received.f_hz == entry["f_hz"] and received.bits == entry["bits"]
    assert received.modeled_energy_j == pytest.approx(entry["e_cmp_j"] + entry["e_com_j"])
    assert content[contract.CONFIG_KEY]["local-epochs"] == 1


def test_a_train_reply_carries_the_codec_bytes_and_the_figures():
    update = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)]
    payload = encode(update, 8, np.random.default_rng(0))
    metrics = contract.TrainMetrics(num_examples=120, d_gen_used=20, train_seconds=1.5, train_loss=0.3,
                                    upload_bytes=len(payload), modeled_energy_j=0.02, bits=8, error_expected=1e-4,
                                    error_measured=1.1e-4, codec_constant=0.9, gen_downlink_bytes=1652,
                                    gen_server_unet_evals=400, gen_server_seconds=0.5, gen_device_unet_evals=400,
                                    gen_device_seconds=0.6, gen_device_energy_j=0.003)
    content = contract.train_reply(payload, metrics, "generated 20")
    array = content[contract.UPDATE_KEY]["payload"]
    assert array.stype == contract.CODEC_STYPE and array.data == payload
    got_payload, got_metrics, note = contract.read_train_reply(content)
    assert decode(got_payload)[0].shape == (3, 4) and note == "generated 20"
    assert got_metrics == {"num-examples": 120, "d-gen-used": 20, "train-seconds": 1.5, "train-loss": 0.3,
                           "upload-bytes": len(payload), "modeled-energy-j": 0.02, "bits": 8,
                           "error-expected": 1e-4, "error-measured": 1.1e-4, "codec-constant": 0.9,
                           "gen-downlink-bytes": 1652, "gen-server-unet-evals": 400, "gen-server-seconds": 0.5,
                           "gen-device-unet-evals": 400, "gen-device-seconds": 0.6, "gen-device-energy-j": 0.003,
                           "gen-price": 0.0, "gen-images": 0, "gen-local-steps": 0, "gen-payment": 0.0}
    assert contract.reply_bytes(content) > len(payload)
    metered = replace(metrics, measured_energy_j=4.25, measured_s=1.7)  # a board with sensors says more
    assert contract.read_train_reply(contract.train_reply(payload, metered, ""))[1] == {
        **got_metrics, "measured-energy-j": 4.25, "measured-s": 1.7}
    silent = contract.train_reply(payload, metrics, "")  # nothing to say: no record Flower cannot count
    assert contract.read_train_reply(silent)[2] == "" and contract.reply_bytes(silent) > len(payload)


def test_the_ray_node_travels_as_text_beside_the_metrics():
    """Where the ClientApp ran (a Ray node id) is text: in the reply's runtime record, never in
    the MetricRecord Flower averages; anything that is not a node id reads as none."""
    payload = encode([np.zeros((2, 2), dtype=np.float32)], 8, np.random.default_rng(0))
    metrics = contract.TrainMetrics(num_examples=10, d_gen_used=0, train_seconds=0.1, train_loss=0.5,
                                    upload_bytes=len(payload), modeled_energy_j=0.01, ray_node="ab" * 28)
    content = contract.train_reply(payload, metrics, "")
    assert "ray-node" not in metrics.to_record() and contract.read_ray_node(content) == "ab" * 28
    assert contract.read_train_reply(content)[1] == contract.read_train_reply(
        contract.train_reply(payload, replace(metrics, ray_node=""), ""))[1]
    assert contract.read_ray_node(contract.train_reply(payload, replace(metrics, ray_node=""), "")) == ""
    for junk in ("not a node", "f" * 500):
        assert contract.read_ray_node(contract.train_reply(payload, replace(metrics, ray_node=junk), "")) == ""


def test_a_plain_numpy_array_is_not_taken_for_a_codec_payload():
    content = RecordDict({contract.UPDATE_KEY: ArrayRecord({"payload": Array(np.zeros(4, np.uint8))}),
                          contract.METRICS_KEY: contract.TrainMetrics(1, 0, 0.0, 0.0, 0, 0.0).to_record()})
    with pytest.raises(contract.ReplyError, match="serialization type"):
        contract.read_train_reply(content)


def test_a_drawn_profile_is_a_profile_the_planner_accepts():
    profile = {"d_loc": 100.0, **drawn_device_profile("fimi", 2, 5, seed=1)}
    assert set(contract.PROFILE_FIELDS) <= set(profile)
    drawn = fimi_scenario(5, 1).devices
    assert profile["f_max_hz"] == drawn.f_max[2] and profile["gain"] == drawn.gain[2]
    scenario = parse_scenario({"system": fimi_scenario(1, 0).to_json()["system"],
                               "devices": [{**profile, "id": "a", "bits": 8, "quant_error": 1e-3}]})
    assert scenario.devices.bits[0] == 8


def test_every_run_setting_is_a_flag_and_comes_back():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--nodes", "4", "--alpha", "0.1", "--t-max", "30", "--resume", "--learning-fit", "f.json",
                              "--generator-steps", "5"])
    run = RunConfig.from_args(args, out_dir="/tmp/x", generator_address="h:1")
    assert (run.num_partitions, run.dirichlet_alpha, run.t_max_s, run.resume) == (4, 0.1, 30.0, True)
    assert (run.learning_fit, run.generator_steps, run.out_dir) == ("f.json", 5, "/tmp/x")
    cli = {f.name for f in fields(RunConfig) if f.metadata["cli"]}
    assert cli == set(vars(args)) - {GIVEN}, "a setting without a flag, or a flag without a setting"
    assert RunConfig.from_run_config(run.to_run_config()) == run


def test_a_job_brings_its_own_defaults_and_a_flag_the_user_gives_wins():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    ddpm = RunConfig.from_args(parser.parse_args(["--job", "ddpm"]), out_dir="x")
    assert {name: getattr(ddpm, name) for name in JOB_DEFAULTS["ddpm"]} == JOB_DEFAULTS["ddpm"]
    classifier_lr = RunConfig().lr
    given = RunConfig.from_args(parser.parse_args(["--job", "ddpm", "--lr", str(classifier_lr), "--policy", "fp32"]),
                                out_dir="x")
    assert (given.lr, given.policy, given.batch_size) == (classifier_lr, "fp32", JOB_DEFAULTS["ddpm"]["batch_size"])
    assert RunConfig.from_args(parser.parse_args([]), out_dir="x").lr == classifier_lr


def test_a_dataset_brings_its_job_defaults_after_the_jobs_and_a_flag_the_user_gives_wins():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    mnist_lr = DATASET_DEFAULTS[("classifier", "mnist5k")]["lr"]
    assert mnist_lr != RunConfig().lr
    assert RunConfig.from_args(parser.parse_args(["--dataset", "mnist5k"]), out_dir="x").lr == mnist_lr
    assert RunConfig.from_args(parser.parse_args(["--dataset", "mnist5k", "--lr", "0.1"]), out_dir="x").lr == 0.1
    ddpm = RunConfig.from_args(parser.parse_args(["--dataset", "mnist5k", "--job", "ddpm"]), out_dir="x")
    assert ddpm.lr == JOB_DEFAULTS["ddpm"]["lr"], "the classifier's dataset default reached the ddpm job"
    assert RunConfig.from_args(parser.parse_args([]), out_dir="x", dataset="mnist5k").lr == mnist_lr


def test_run_config_values_are_read_back_with_their_types():
    run = RunConfig.from_run_config({"num-partitions": "7", "resume": "true", "lr": 1, "unknown-key": 3})
    assert run.num_partitions == 7 and run.resume is True and run.lr == 1.0 and isinstance(run.lr, float)


def test_a_plan_from_an_older_server_parses_with_the_runs_own_delivery():
    """A TRAIN message without the delivery keys (a server before split generation) still
    parses; the device then uses the run's delivery settings."""
    plan = contract.NodePlan(server_round=1, policy="fimi", d_gen=10, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5, bits=8,
                             t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1)
    config = {k: v for k, v in plan.to_config().items() if not k.startswith("gen-")}
    assert contract.NodePlan.from_config(config) == plan and plan.gen_delivery == ""
    chosen = replace(plan, gen_delivery="state", gen_server_steps=10, gen_state_bits=4)
    assert contract.NodePlan.from_config(chosen.to_config()) == chosen
    with pytest.raises(contract.ReplyError, match="'bits' missing"):
        contract.NodePlan.from_config({k: v for k, v in config.items() if k != "bits"})
    priced = replace(plan, gen_price=0.25)
    assert contract.NodePlan.from_config(priced.to_config()) == priced and plan.gen_price == 0.0


@pytest.mark.parametrize("key, value, reason", [
    ("gen-price", float("nan"), "must be finite"), ("gen-price", -0.1, "non-negative"),
    ("gen-price", 1e300, "at most"), ("gen-price", "0.3", "must be a number"), ("bits", 40, "from 2 to 32"),
    ("d-gen", 2.5, "whole number"), ("gen-delivery", 3, "must be text"), ("f-hz", float("inf"), "finite"),
])
def test_a_plan_field_out_of_its_range_is_refused_with_the_field_named(key, value, reason):
    plan = contract.NodePlan(server_round=1, policy="fimi", d_gen=10, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5, bits=8,
                             t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1, gen_price=0.2)
    with pytest.raises(contract.ReplyError, match=f"plan field '{key}'.*{reason}"):
        contract.NodePlan.from_config({**plan.to_config(), key: value})
