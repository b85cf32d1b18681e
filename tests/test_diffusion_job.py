"""The ddpm job (jobs.ddpm): a device's fine-tuning step, the server's evaluation,
the device keeping its error demand, and the whole job through `fedfill run` and
`fedfill compare` on both of Flower's engines."""

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedfill import codec, contract
from fedfill.config import RunConfig
from jobs import load_job
from generation.checkpoint import save_checkpoint
from generation.config import DEFAULT_CHECKPOINT, CheckpointError, GeneratorConfig, build_unet

ROOT = Path(__file__).resolve().parents[1]
RUN = RunConfig(job="ddpm", num_partitions=4, lr=5e-4, batch_size=32, local_epochs=1, eval_per_class=4)


def test_a_device_step_fine_tunes_the_start_deterministically():
    job = load_job(RUN)
    start = job.initial_weights()
    data = job.node_data(0, 4)
    first = job.train(start, data.images, data.labels, seed=3)
    again = job.train(start, data.images, data.labels, seed=3)
    assert len(first.weights) == len(start) and all(w.shape == s.shape for w, s in zip(first.weights, start))
    assert np.isfinite(first.loss) and first.seconds > 0
    changed = sum(not np.array_equal(w, s) for w, s in zip(first.weights, start))
    assert changed > len(start) // 2, "AdamW moves (almost) every tensor"
    assert all(np.array_equal(a, b) for a, b in zip(first.weights, again.weights)), "same seed, same update"


def test_the_evaluation_scores_every_class_and_those_the_start_never_saw():
    job = load_job(RUN)
    metrics = job.evaluate(job.initial_weights())
    assert set(metrics) == set(job.metrics) == {"fidelity", "frechet", "fidelity_unseen", "frechet_unseen"}
    assert 0 <= metrics["fidelity_unseen"] <= metrics["fidelity"] <= 1
    assert metrics["frechet_unseen"] > metrics["frechet"] > 0, "the start draws its own classes better"


def test_a_nan_loss_sends_no_update_and_says_why():
    job = load_job(replace(RUN, lr=1e30))
    data = job.node_data(1, 4)
    with pytest.raises(ValueError, match=r"loss became nan at local step \d+ \(lr 1e\+30\): no update sent"):
        job.train(job.initial_weights(), data.images, data.labels, seed=0)


def test_a_start_checkpoint_that_does_not_fit_the_data_is_refused(tmp_path):
    from jobs.ddpm import check_run

    small = GeneratorConfig(image_size=8, channels=1, num_classes=3, block_out_channels=(8, 16),
                            class_names=("a", "b", "c"))
    save_checkpoint(tmp_path / "three", small, build_unet(small))
    with pytest.raises(CheckpointError, match="draws 3 classes, digits has 10"):
        check_run(replace(RUN, start_checkpoint=str(tmp_path / "three")))
    wide = GeneratorConfig(image_size=16, channels=1, num_classes=10, block_out_channels=(8, 16),
                           class_names=tuple("0123456789"))
    save_checkpoint(tmp_path / "wide", wide, build_unet(wide))
    with pytest.raises(CheckpointError, match="16x16x1 images, digits's are 8x8x1"):
        check_run(replace(RUN, start_checkpoint=str(tmp_path / "wide")))
    with pytest.raises(CheckpointError, match="no generator checkpoint"):
        check_run(replace(RUN, start_checkpoint=str(tmp_path / "none")))
    with pytest.raises(CheckpointError, match="is a GAN generator; the ddpm job fine-tunes a diffusion"):
        check_run(replace(RUN, start_checkpoint=str(DEFAULT_CHECKPOINT.parent / "digits-gan")))
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer, got 0"):
        check_run(replace(RUN, trainable="lora", lora_rank=0))


def plan_for(bits: int, demand: float) -> contract.NodePlan:
    return contract.NodePlan(server_round=1, policy="ondemand", d_gen=0, f_hz=1e9, b_hz=1e6, p_w=0.1, eta=0.5,
                             bits=bits, t_cmp_s=1.0, t_com_s=1.0, e_cmp_j=0.1, e_com_j=0.1, error_demand=demand)


def test_the_device_raises_the_planned_bits_until_its_demand_holds():
    from client.app import quantize_update

    rng = np.random.default_rng(0)
    update = [rng.standard_normal((64, 32)).astype(np.float32) * 0.01, rng.standard_normal(500).astype(np.float32)]
    demand = 1e-4
    payload, figures = quantize_update(update, plan_for(4, demand), np.random.default_rng(1))
    assert figures["bits"] > 4 and figures["error_expected"] <= demand
    assert {type(v) for v in figures.values()} <= {int, float}, "what a MetricRecord carries"
    assert codec.relative_error(update, figures["bits"] - 1) > demand, "the fewest bits that keep the demand"
    assert figures["error_measured"] == pytest.approx(figures["error_expected"], rel=0.25)
    assert len(payload) == codec.payload_bytes([u.size for u in update], figures["bits"])
    # a plan whose bits already keep the demand is sent as planned; no demand, no checks
    assert quantize_update(update, plan_for(20, demand), np.random.default_rng(1))[1]["bits"] == 20
    assert quantize_update(update, plan_for(3, 0.0), np.random.default_rng(1))[1]["bits"] == 3


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def fedfill(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "fedfill", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_compare_runs_the_ddpm_job_under_each_scheme_and_keeps_every_demand(tmp_path):
    """One compare on the deployment engine with LoRA adapters (the simulation engine runs the
    same apps: the classifier job's tests cover it): the report's columns, the demands kept on
    the devices, only the adapters on the wire, the figures, the saved generator."""
    done = fedfill("compare", "--job", "ddpm", "--engine", "deployment", "--trainable", "lora", "--lora-rank", "2",
                   "--policies", "fp32,ondemand", "--nodes", "2", "--rounds", "1", "--local-epochs", "1",
                   "--eval-per-class", "3", "--out", str(tmp_path), "--timeout", "800")
    assert done.returncode == 0, done.stdout + done.stderr
    adapters = load_job(replace(RUN, trainable="lora", lora_rank=2)).initial_weights()
    for policy in ("fp32", "ondemand"):
        table = rows(tmp_path / policy / "rounds.csv")
        assert [int(r["round"]) for r in table] == [0, 1]
        assert {"frechet", "fidelity", "energy_j", "latency_s", "uplink_bytes"} <= set(table[0])
        assert float(table[0]["energy_j"]) == 0 < float(table[1]["energy_j"])
        devices = rows(tmp_path / policy / "devices.csv")
        assert len(devices) == 2 and all(d["status"] == "used" for d in devices)
        summary = json.loads((tmp_path / policy / "summary.json").read_text())
        assert summary["model_params"] == sum(a.size for a in adapters) < 100_000, "adapters only"
    fp32 = rows(tmp_path / "fp32" / "devices.csv")
    assert {d["bits"] for d in fp32} == {"32"} and all(d["error_demand"] == "" for d in fp32)
    payload = codec.payload_bytes([a.size for a in adapters], 32)
    assert 2 * payload <= int(rows(tmp_path / "fp32" / "rounds.csv")[1]["uplink_bytes"]) <= 2 * (payload + 2_000)
    for d in rows(tmp_path / "ondemand" / "devices.csv"):
        assert int(d["bits"]) >= int(d["bits_planned"]) and int(d["bits"]) < 32
        assert float(d["error_expected"]) <= float(d["error_demand"])
        assert float(d["error_measured"]) <= 1.5 * float(d["error_demand"])
    fp32_bytes = int(rows(tmp_path / "fp32" / "rounds.csv")[1]["uplink_bytes"])
    assert int(rows(tmp_path / "ondemand" / "rounds.csv")[1]["uplink_bytes"]) < fp32_bytes / 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["policies"]["ondemand"]["max_error_ratio"] <= 1.5
    assert summary["policies"]["fp32"]["max_error_ratio"] is None
    for picture in ("schemes.png", "energy_vs_tmax.png", "policies.png"):
        assert (tmp_path / picture).stat().st_size > 0
    from generation.checkpoint import load_generator

    config, pipe = load_generator(tmp_path / "ondemand" / "generator")  # merged: a plain UNet diffusers loads
    assert config.provenance["federated"]["policy"] == "ondemand" and config.num_classes == 10
    assert type(pipe.unet).__name__ == "UNet2DModel" and config.provenance["federated"]["trainable"] == "lora"


def test_bad_ddpm_settings_stop_the_run_before_anything_starts(tmp_path):
    for args, message in ((["--trainable", "lora", "--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
                          (["--start-checkpoint", str(tmp_path / "nowhere")], "no generator checkpoint"),
                          (["--policy", "fixed-1"], "policy")):
        done = fedfill("run", "--job", "ddpm", "--out", str(tmp_path / "out"), *args, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
        assert not (tmp_path / "out" / "flwr.log").exists()
