"""What Flower's machinery costs per round, against the local training it carries.

    python bench/bench_flower.py                 # both engines, 3 nodes, 6 rounds (~3 min)
    python bench/bench_flower.py --bits 8        # quantized uploads

Runs `fedfill run` on the simulation engine (Ray) and the deployment engine (real
SuperLink/SuperNode processes), then reads the report: per round, the wall time the server
saw against the slowest client's measured training time (the rest is process start,
scheduling, polling and serialization), and the bytes the replies carried against the
model's M x bits / 8 per update. Ratios are measured in this run; round 1 is left out of the
timing (it includes first imports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.report import read_rounds  # noqa: E402


def run_engine(engine: str, nodes: int, rounds: int, out: Path, extra: list[str]) -> tuple[list[dict], dict, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", "--engine", engine, "--nodes", str(nodes),
                           "--rounds", str(rounds), "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = read_rounds(out / "rounds.csv")
    return rows, json.loads((out / "summary.json").read_text()), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bits", type=int, default=32, help="quantize uploads (fimi+ondemand with this demand)")
    args = parser.parse_args()
    extra = []
    if args.bits != 32:
        scenario = Path(tempfile.mkdtemp()) / "s.json"
        subprocess.run([sys.executable, "-m", "fedfill", "scenario", "--devices", str(args.nodes), "--out", str(scenario)],
                       cwd=ROOT, check=True)
        data = json.loads(scenario.read_text())
        for device in data["devices"]:
            device["bits"] = args.bits
        scenario.write_text(json.dumps(data))
        extra = ["--scenario", str(scenario)]
    print(f"{'engine':>11} | {'total s':>7} {'startup s':>9} | {'round s':>7} {'train s':>7} {'overhead':>8} | "
          f"{'bytes/update':>12} {'M*bits/8':>10} {'ratio':>7}")
    for engine in ("simulation", "deployment"):
        with tempfile.TemporaryDirectory() as tmp:
            engine_extra = extra if engine == "deployment" else []
            rows, summary, total = run_engine(engine, args.nodes, args.rounds, Path(tmp), engine_extra)
        trained = [r for r in rows if r["round"] >= 2]
        round_s = sum(r["wall_s"] for r in trained) / len(trained)
        train_s = sum(r["train_s_max"] for r in trained) / len(trained)
        startup = total - sum(r["wall_s"] for r in rows if r["round"] >= 1)
        bits = args.bits if engine == "deployment" else 32
        per_update = sum(r["round_uplink_bytes"] for r in trained) / sum(r["updates"] for r in trained)
        ideal = summary["model_params"] * bits / 8
        print(f"{engine:>11} | {total:7.1f} {startup:9.1f} | {round_s:7.2f} {train_s:7.3f} {round_s / train_s:7.0f}x | "
              f"{per_update:12.0f} {ideal:10.0f} {per_update / ideal:7.4f}")
    print("overhead = round wall time / slowest client's training time; ratio = bytes in the reply's records / (M x bits / 8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
