"""`fedfill reproduce`: bad input refused before anything starts, the campaign's runs each
made once, and a real small campaign (Flower's simulation engine, the generation service)
that writes [FIMI Table I], [FIMI Fig. 4], [FIMI Fig. 5e-g], and resumes without redoing finished runs."""

import json
import subprocess
import sys

import pytest

from fedfill.cli import main
from commands.reproduce import ABLATIONS, METHODS, campaign, run_flags, run_state, sweep_point


@pytest.mark.parametrize("flags, says", [
    (["--methods", "tfl,fedprox"], "unknown 'fedprox'"),
    (["--ablations", "no-xy"], "unknown 'no-xy'"),
    (["--delta-max", "0.2,1.5"], "1.5 is outside (0, 1)"),
    (["--t-max", "0,60"], "0 is outside"),
    (["--t-max", "abc"], "numbers expected"),
    (["--splits", "0.4,-1"], "-1 is outside"),
    (["--methods", "gan", "--gan-checkpoint", "/nonexistent"], "--gan-checkpoint /nonexistent"),
    (["--methods", "fimi,fimi"], "given twice"),
    (["--target", "1.5"], "--target"),
    (["--seeds", "0,one"], "whole numbers"),
    (["--seeds", "1,1"], "a seed given twice"),
    (["--seeds", "0,-2"], "of 0 or more"),
    (["--seeds", "0,1", "--methods", "tfl,fedprox"], "unknown 'fedprox'"),
])
def test_bad_input_is_refused_before_anything_starts(tmp_path, capsys, flags, says):
    out = tmp_path / "campaign"
    assert main(["reproduce", "--out", str(out), *flags]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists(), "nothing is written for a refused campaign"


def test_the_campaign_makes_each_run_once_and_shares_runs_between_figures():
    runs = campaign([0.4, 0.6], list(METHODS), list(ABLATIONS), [0.15, 0.2, 0.25, 0.3], [30.0, 60.0, 90.0], 0.6)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    # 7 methods x 2 splits, + w/o BA and w/o OA (w/o DA is TFL, w/o DM the GAN run), + 3 + 2 sweep points
    assert len(runs) == 14 + 2 + 3 + 2
    by_name = {r.name: r for r in runs}
    assert by_name["split-0.6/sst"].settings == {"dirichlet_alpha": 0.6, "policy": "tfl", "synthetic_use": "server"}
    assert by_name["split-0.4/gan"].generator == "gan" and by_name["split-0.4/clsd"].centralised
    assert by_name["split-0.6/delta-max-0.15"].settings["delta_max"] == 0.15
    assert sweep_point("delta_max", 0.2) == "fimi" and sweep_point("t_max_s", 60.0) == "fimi"
    assert by_name["split-0.6/fimi-equal-band"].settings["policy"] == "fimi-equal-band"


def test_run_flags_make_the_same_run_config(tmp_path):
    import argparse

    from fedfill.config import RunConfig
    from commands.run import add_run_flags

    config = RunConfig(policy="fimi-uniform", dirichlet_alpha=0.6, delta_max=0.15, synthetic_use="unlabelled",
                       t_max_s=30.0, resume=True, num_partitions=7)
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    assert RunConfig.from_args(parser.parse_args(run_flags(config))) == config


def test_run_state_tells_done_partial_and_new(tmp_path):
    assert run_state(tmp_path, 2) == "new"
    (tmp_path / "checkpoint.npz").write_bytes(b"")
    assert run_state(tmp_path, 2) == "partial"
    clsd = tmp_path / "clsd"
    clsd.mkdir()
    (clsd / "clsd.json").write_text(json.dumps({"curve": [{"epoch": 1}, {"epoch": 2}]}))
    assert run_state(clsd, 2) == "done" and run_state(clsd, 3) == "new"


@pytest.mark.slow
def test_a_small_campaign_writes_the_evaluation_and_resumes(tmp_path):
    """3 devices, 2 rounds, one split: TFL, SEMI, SST, GAN, CLSD and FIMI, the w/o DA, DM and OA
    ablations and a two-point T_max sweep (8 runs, one at a time: the suite's other workers run
    Flower and containers on the same two cores), samples of 2 DDIM steps to keep it short."""
    out = tmp_path / "campaign"
    command = [sys.executable, "-m", "fedfill", "reproduce", "--out", str(out), "--nodes", "3", "--rounds", "2",
               "--splits", "0.6", "--methods", "tfl,semi,sst,gan,clsd,fimi", "--ablations", "no-oa,no-dm,no-da",
               "--delta-max", "none", "--t-max", "30,60", "--generator-steps", "2", "--target", "0.3", "--jobs", "1"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = json.loads((out / "table1.json").read_text())
    assert table["target_accuracy"] == 0.3 and list(table["splits"]) == ["0.6"]
    entries = table["splits"]["0.6"]
    assert set(entries) == {"tfl", "semi", "sst", "gan", "clsd", "fimi"}
    keys = {"best_accuracy", "energy_at_target_j", "latency_at_target_s", "uplink_at_target_bytes", "rounds_to_target"}
    for entry in entries.values():
        assert set(entry) == keys
        assert 0 < entry["best_accuracy"] <= 1
    assert entries["clsd"]["energy_at_target_j"] is None and entries["clsd"]["rounds_to_target"] is None
    for method in ("tfl", "semi", "sst", "gan", "fimi"):
        rows = (out / "split-0.6" / method / "rounds.csv").read_text().splitlines()
        assert len(rows) == 1 + 3, method  # header, rounds 0..2
    # each baseline ran as its settings say
    assert "synthetic-use = \"server\"" in (out / "split-0.6" / "sst" / "run_config.toml").read_text()
    assert "synthetic-use = \"unlabelled\"" in (out / "split-0.6" / "semi" / "run_config.toml").read_text()
    # the GAN run's samples came from the GAN's own service, the others' from the diffusion model's
    for generator in ("gan", "diffusion"):
        assert any((out / "generator-cache" / generator).glob("*.npz")), generator
    from server.report import read_rounds

    for method, synthetic in (("gan", True), ("fimi", True), ("semi", True), ("tfl", False), ("sst", False)):
        used = read_rounds(out / "split-0.6" / method / "rounds.csv")[1]["synthetic_used"]
        assert (used > 0) == synthetic, (method, used)
    markdown = (out / "table1.md").read_text()
    assert "| TFL |" in markdown and "| CLSD | N/A | N/A | N/A | N/A |" in markdown
    for figure in ("fig4_accuracy.png", "fig5e_ablation.png", "fig5g_t_max.png"):
        assert (out / figure).stat().st_size > 10_000, figure
    ablation = json.loads((out / "fig5e_ablation.json").read_text())
    assert list(ablation) == ["FIMI", "w/o DA", "w/o DM", "w/o OA"]
    assert set(json.loads((out / "fig5g_t_max.json").read_text())) == {"30", "60"}
    # the same command again: every run is done, none runs twice
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("split-0.6/*/rounds.csv")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 runs (8 already done)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("split-0.6/*/rounds.csv")} == stamps


def test_an_interrupt_ends_the_runs_in_flight_and_starts_no_other(tmp_path):
    import threading
    import time

    from commands.reproduce import Children

    children = Children()
    codes = []
    with open(tmp_path / "log", "w") as log:
        worker = threading.Thread(target=lambda: codes.append(children.run(["sleep", "30"], log)))
        worker.start()
        while not children.running:
            time.sleep(0.01)
        started = time.monotonic()
        children.stop()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 5
        assert codes == [-15], "SIGTERM ended it"
        assert children.run(["sleep", "30"], log) == 130 and not children.running, "nothing starts after a stop"


def _entry(rounds, energy, best):
    return {"best_accuracy": best, "energy_at_target_j": energy, "latency_at_target_s": None,
            "uplink_at_target_bytes": None, "rounds_to_target": rounds}


def test_across_seeds_compares_each_seed_with_its_own_tfl_and_counts_the_seeds_that_reached():
    from commands.paper_figures import across_seeds, across_seeds_markdown

    tables = {0: {"target_accuracy": 0.9, "splits": {"0.6": {"tfl": _entry(20, 2.0, 0.95),
                                                             "fimi": _entry(10, 1.0, 0.97)}}},
              1: {"target_accuracy": 0.9, "splits": {"0.6": {"tfl": _entry(30, 4.0, 0.93),
                                                             "fimi": _entry(None, None, 0.89)}}},
              2: {"target_accuracy": 0.9, "splits": {"0.6": {"tfl": _entry(10, 1.0, 0.96),
                                                             "fimi": _entry(8, 0.8, 0.98)}}}}
    ablations = {0: {"FIMI": _entry(10, 1.0, 0.97), "w/o DA": _entry(20, 2.0, 0.95)}}
    summary = across_seeds(tables, ablations)
    fimi = summary["splits"]["0.6"]["fimi"]
    assert (fimi["seeds_run"], fimi["seeds_reached"]) == (3, 2)
    assert fimi["energy_vs_tfl"] == pytest.approx({"mean": 0.65, "min": 0.5, "max": 0.8})  # 1/2 and 0.8/1
    assert fimi["rounds_to_target"] == {"mean": 9, "min": 8, "max": 10}
    assert fimi["best_accuracy"]["min"] == pytest.approx(0.89)  # a seed that missed the target still counts here
    assert summary["splits"]["0.6"]["tfl"]["energy_vs_tfl"] == {"mean": 1.0, "min": 1.0, "max": 1.0}
    assert summary["ablations"]["w/o DA"]["seeds_run"] == 1
    markdown = across_seeds_markdown(summary)
    assert "| FIMI | 2/3 | 9.0 (8-10) | 0.65x (0.50x-0.80x) |" in markdown
    assert "| w/o DA | 1/1 | 20.0 | 2.000 |" in markdown


def test_seeds_run_one_campaign_each_and_tabulate_them_together(tmp_path):
    """Two seeds of a two-method campaign (3 devices, 2 rounds): each seed's directory is an
    ordinary campaign, and seeds.json holds both."""
    out = tmp_path / "seeds"
    command = [sys.executable, "-m", "fedfill", "reproduce", "--out", str(out), "--seeds", "0,1", "--nodes", "3",
               "--rounds", "2", "--splits", "0.6", "--methods", "tfl,fimi", "--ablations", "none",
               "--delta-max", "none", "--t-max", "none", "--generator-steps", "2", "--target", "0.3", "--jobs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for seed in (0, 1):
        campaign = json.loads((out / f"seed-{seed}" / "campaign.json").read_text())
        assert campaign["seed"] == seed and campaign["failed"] == []
        assert 'seed = %d' % seed in (out / f"seed-{seed}" / "split-0.6" / "fimi" / "run_config.toml").read_text()
    # different seeds, different splits: the two TFL runs did not train the same model
    first, second = (json.loads((out / f"seed-{s}" / "table1.json").read_text())["splits"]["0.6"]["tfl"]
                     for s in (0, 1))
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["splits"]["0.6"]) == {"tfl", "fimi"}
    tfl = summary["splits"]["0.6"]["tfl"]
    assert tfl["seeds_run"] == 2
    assert tfl["best_accuracy"]["min"] == pytest.approx(min(first["best_accuracy"], second["best_accuracy"]))
    assert "| TFL | " in (out / "seeds.md").read_text()
