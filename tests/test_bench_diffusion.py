"""bench/bench_diffusion.py: its three sections run and print numbers that make sense (the
speed and bytes sections on tiny settings, the energy section on a fake compare directory
written with the report's own writer)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.report import RunReport

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_diffusion.py"
METRICS = ("fidelity", "frechet", "fidelity_unseen", "frechet_unseen")
NUMBER = r"[\d.,e+-]+"


def bench(*args: str, timeout: float = 150) -> str:
    done = subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_speed_and_bytes_on_tiny_settings():
    out = bench("--sections", "speed,bytes,energy", "--steps", "2", "--repeat", "1", "--batches", "32",
                "--local-epochs", "1")

    speed = {m[3]: m[1:] for m in re.findall(
        rf"^\s*(cpu|cuda)\s+(eager|graph)\s+(\d+)\s+(full|lora r4)\s+({NUMBER})\s+(\d+) \|\s+({NUMBER})\s+(\d+)% \|"
        rf"\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$", out, re.M) if m[0] == "cpu"}
    assert set(speed) == {"full", "lora r4"}, out
    assert number(speed["full"][3]) == 1_003_137 and number(speed["lora r4"][3]) == 82_560
    for kind, batch, _, _, steps, seconds, in_loop, rate, images, _, vs_eager in speed.values():
        assert kind == "eager" and number(vs_eager) == 1.0, "the CPU has no CUDA graph"
        assert int(batch) == 32 and int(steps) >= 2
        assert number(rate) == pytest.approx(int(steps) / number(seconds), rel=0.02)
        assert number(images) == pytest.approx(number(rate) * 32, rel=0.02)
        assert 0 < int(in_loop) <= 100
    assert number(speed["full"][9]) == 1.0
    assert number(speed["lora r4"][9]) == pytest.approx(number(speed["lora r4"][7]) / number(speed["full"][7]),
                                                         abs=0.02)

    rows = re.findall(rf"^\s*(full|lora r\d)\s+({NUMBER})\s+(\d+)\s+(\d+) \|\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})"
                      rf"\s+({NUMBER}) \|\s+({NUMBER})\s*({NUMBER})?$", out, re.M)
    table = {(name, int(bits)): (number(m), number(sent), number(model), number(ratio), number(vs_full),
                                 number(error), number(on_ba) if on_ba else None)
             for name, m, _, bits, sent, model, ratio, vs_full, error, on_ba in rows}
    assert {name for name, _ in table} == {"full", "lora r1", "lora r4", "lora r8"}, out
    assert {bits for _, bits in table} == {4, 6, 7, 8, 32}
    for (name, bits), (m, sent, model, ratio, vs_full, error, on_ba) in table.items():
        assert model == pytest.approx(m * bits / 8, abs=1)
        assert sent >= model and ratio >= 1 and ratio == pytest.approx(sent / model, abs=1e-4)
        if name == "full":
            assert on_ba is None and vs_full == 1
        else:
            assert vs_full < 0.2, "LoRA uploads far fewer bytes than the full model"
            assert on_ba is not None and (on_ba == 0) == (bits == 32)
        assert (error == 0) == (bits == 32)
    assert table["full", 8][3] < 1.01, "the headers are under 1% of the full model at 8 bits"
    assert table["lora r1", 4][3] > table["lora r8", 4][3] > table["full", 4][3], "small updates pay more headers"
    for name in ("full", "lora r4"):
        errors = [table[name, bits][5] for bits in (4, 6, 7, 8)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, "more bits, less error"

    assert "needs a compare directory" in out and "fedfill compare --job ddpm" in out


def write_compare(root: Path, policies: dict[str, tuple[list[float], float, int]]) -> None:
    """A compare directory: per policy the Fréchet distance of rounds 0.., and each trained
    round's energy (J) and uplink bytes, written as `fedfill run` writes rounds.csv."""
    for policy, (frechet, energy_j, uplink) in policies.items():
        report = RunReport(root / policy, {"policy": policy}, metrics=METRICS)
        for server_round, distance in enumerate(frechet):
            if server_round:
                report.round_costs(server_round, {"energy-j": energy_j, "latency-s": 1.0,
                                                  "uplink-bytes": uplink, "updates": 4}, [])
            report.add_round(server_round, {"fidelity": 0.5, "frechet": distance, "fidelity_unseen": 0.2,
                                            "frechet_unseen": 2 * distance})


def test_energy_at_equal_frechet_distance(tmp_path):
    write_compare(tmp_path, {"fixed-8": ([10.0, 6.0, 3.4, 3.0], 2.0, 1000),
                             "ondemand": ([10.0, 7.0, 5.0, 3.5], 1.0, 700)})
    out = bench("--sections", "energy", "--compare", str(tmp_path), timeout=60)
    # the worst final distance, 3.5 (ondemand): fixed-8 reaches it in round 2 (4 J, 2000 bytes),
    # ondemand in round 3 (3 J, 2100 bytes)
    assert "target Fréchet <= 3.5000, the worst final Fréchet distance (ondemand)" in out
    assert re.search(r"^\s*fixed-8\s+3\.0000 \|\s+2\s+3\.4000\s+4\s+0\.002 \|\s+1\.000\s+1\.000$", out, re.M), out
    assert re.search(r"^\s*ondemand\s+3\.5000 \|\s+3\s+3\.5000\s+3\s+0\.002 \|\s+0\.750\s+1\.050$", out, re.M), out
    assert "ondemand / fixed-8 at Fréchet <= 3.5000: energy 0.750, uplink 1.050 (rounds 3 and 2)" in out

    out = bench("--sections", "energy", "--compare", str(tmp_path), "--frechet-target", "5", timeout=60)
    assert "ondemand / fixed-8 at Fréchet <= 5.0000: energy 0.500, uplink 0.700 (rounds 2 and 2)" in out
    out = bench("--sections", "energy", "--compare", str(tmp_path), "--frechet-target", "1", timeout=60)
    assert re.search(r"^\s*ondemand\s+3\.5000 \|\s+N/A", out, re.M)
    assert "ondemand / fixed-8: N/A (one of them never reaches the target)" in out


def test_trainer_section_times_the_generator_trainer_by_a_difference_of_runs():
    out = bench("--sections", "trainer", "--trainer-steps", "2", "6", "--trainer-batches", "16", "4096",
                "--batches", "32")
    rows = re.findall(rf"^\s*(cpu|cuda)\s+(eager|graph)\s+(\d+) \|\s+({NUMBER})\s+({NUMBER}) \|\s+(.*)$", out, re.M)
    cpu = [row for row in rows if row[0] == "cpu"]
    assert [(kind, int(batch)) for _, kind, batch, *_ in cpu] == [("eager", 16)], "4096 is left to a GPU"
    _, _, _, short, long, figures = cpu[0]
    assert number(short) > 0 and number(long) > 0
    if number(long) <= number(short):  # 2 and 6 steps: a loaded machine's noise can outweigh 4 steps
        assert figures.startswith("N/A") and "more steps apart" in figures, out
        return
    rate, images, vs_eager = figures.split()
    assert number(rate) == pytest.approx(4 / (number(long) - number(short)), rel=0.05)
    assert number(images) == pytest.approx(number(rate) * 16, rel=0.05)
    assert number(vs_eager) == 1.0


def test_bad_trainer_steps_are_refused():
    done = subprocess.run([sys.executable, str(BENCH), "--sections", "trainer", "--trainer-steps", "6", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--trainer-steps takes two lengths, the shorter first" in done.stderr
