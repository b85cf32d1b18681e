"""What Flower's machinery costs per round, against the local training it carries.

    python bench/bench_flower.py                          # 3 and 10 nodes, 6 rounds each (~12 min)
    python bench/bench_flower.py --nodes 3 --rounds 4     # one size, quicker
    python bench/bench_flower.py --bits 8                 # quantized uploads
    python bench/bench_flower.py --engines flower,warm    # leave the simulation engine out
    python bench/bench_flower.py --nodes 3 --rounds 4 --run-args "--local-epochs 80 --t-max 600"   # ~30 s of training

For each fleet size, in one run: `fedfill run` on the deployment engine with Flower's
SuperNode as it ships (`--clientapp flower`: a cold flwr-clientapp process per task, Flower's
fixed waits) and with fedfill's (`--clientapp warm`, client/supernode.py), and on the
simulation engine (Ray) for reference. From each report, per round (round 1 is left out: it
includes first imports): the wall time the server saw against the slowest client's measured
training, and where the rest went, for the node whose reply came last (devices.csv):

    pull+spawn   the server's push -> the ClientApp process began (the SuperNode's pull of the
                 message, SuperExec's task poll, the process's start)
    launch       the process's start -> its train handler (imports, Flower's hand-over)
    data+codec   the handler's start -> its reply, less the training (data, synthetic samples,
                 quantizing)
    upload       the reply made -> the server holding it
    server       the round's wall time less that node's path (planning, aggregation, central
                 evaluation, checkpoint, report)

plus the bytes a reply carried against the model's M x bits / 8. Ratios are measured in this run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.report import read_nodes, read_rounds  # noqa: E402

ENGINES = {"flower": ["--engine", "deployment", "--clientapp", "flower"],
           "warm": ["--engine", "deployment", "--clientapp", "warm"],
           "simulation": ["--engine", "simulation"]}
PARTS = ("pull+spawn", "launch", "data+codec", "upload", "server")


def run_engine(engine: str, nodes: int, rounds: int, out: Path, extra: list[str]) -> tuple[list[dict], list[dict], dict, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedfill", "run", *ENGINES[engine], "--nodes", str(nodes),
                           "--rounds", str(rounds), "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return (read_rounds(out / "rounds.csv"), read_nodes(out / "devices.csv"),
            json.loads((out / "summary.json").read_text()), time.monotonic() - started)


def breakdown(round_row: dict, node_rows: list[dict]) -> dict | None:
    """Where a round's seconds went, for the node whose reply came last (module docstring);
    None when the nodes did not report their timestamps."""
    paths = [(row["delivery_s"] + row["handler_s"] + row["upload_s"], row) for row in node_rows
             if all(row.get(key) is not None for key in ("delivery_s", "launch_s", "handler_s", "upload_s", "train_s"))]
    if not paths:
        return None
    path, last = max(paths, key=lambda pair: pair[0])
    return {"pull+spawn": last["delivery_s"] - last["launch_s"], "launch": last["launch_s"],
            "data+codec": last["handler_s"] - last["train_s"], "upload": last["upload_s"],
            "server": round_row["wall_s"] - path}


def measure(engine: str, nodes: int, rounds: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rows, node_rows, summary, total = run_engine(engine, nodes, rounds, Path(tmp), extra)
    trained = [r for r in rows if r["round"] >= 2]
    # Ray's ClientApp actors live across rounds: a process start says nothing there
    parts = [] if engine == "simulation" else [
        b for r in trained if (b := breakdown(r, [n for n in node_rows if n["round"] == r["round"]]))]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    round_s, train_s = mean([r["wall_s"] for r in trained]), mean([r["train_s_max"] for r in trained])
    return {"engine": engine, "nodes": nodes, "total_s": total,
            "startup_s": total - sum(r["wall_s"] for r in rows if r["round"] >= 1),
            "round_s": round_s, "train_s": train_s, "overhead_s": round_s - train_s,
            "parts": {p: mean([b[p] for b in parts]) for p in PARTS} if parts else None,
            "bytes_per_update": sum(r["round_uplink_bytes"] for r in trained) / sum(r["updates"] for r in trained),
            "model_params": summary["model_params"]}


def scenario_with_bits(nodes: int, bits: int) -> list[str]:
    if bits == 32:
        return []
    scenario = Path(tempfile.mkdtemp()) / "s.json"
    subprocess.run([sys.executable, "-m", "fedfill", "scenario", "--devices", str(nodes), "--out", str(scenario)],
                   cwd=ROOT, check=True, capture_output=True)
    data = json.loads(scenario.read_text())
    for device in data["devices"]:
        device["bits"] = bits
    scenario.write_text(json.dumps(data))
    return ["--scenario", str(scenario)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10", help="fleet sizes, comma-separated (default 3,10)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bits", type=int, default=32, help="quantize uploads (deployment engine) to this width")
    parser.add_argument("--engines", default="flower,warm,simulation", help=f"of {', '.join(ENGINES)}")
    parser.add_argument("--run-args", default="",
                        help="more `fedfill run` flags for every run, e.g. \"--local-epochs 80 --t-max 600\" "
                             "(clients train longer)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    results = []
    header = (f"{'nodes':>5} {'engine':>10} | {'total s':>7} {'start s':>7} | {'round s':>7} {'train s':>7} "
              f"{'overhead':>8} | " + " ".join(f"{p:>10}" for p in PARTS) + f" | {'bytes/upd':>9} {'ratio':>6}")
    print(header)
    for nodes in [int(n) for n in args.nodes.split(",")]:
        for engine in engines:
            extra = scenario_with_bits(nodes, args.bits) if engine != "simulation" else []
            extra += shlex.split(args.run_args)
            result = measure(engine, nodes, args.rounds, extra)
            bits = args.bits if engine != "simulation" else 32
            result["ratio"] = result["bytes_per_update"] / (result["model_params"] * bits / 8)
            results.append(result)
            parts = result["parts"]
            print(f"{nodes:>5} {engine:>10} | {result['total_s']:7.1f} {result['startup_s']:7.1f} | "
                  f"{result['round_s']:7.2f} {result['train_s']:7.2f} {result['overhead_s']:8.2f} | "
                  + " ".join(f"{parts[p]:10.2f}" if parts else f"{'-':>10}" for p in PARTS)
                  + f" | {result['bytes_per_update']:9.0f} {result['ratio']:6.3f}", flush=True)
        base = next((r for r in results if r["nodes"] == nodes and r["engine"] == "flower"), None)
        warm = next((r for r in results if r["nodes"] == nodes and r["engine"] == "warm"), None)
        if base and warm:
            print(f"{nodes:>5} nodes: warm / flower overhead per round {warm['overhead_s'] / base['overhead_s']:.2f} "
                  f"({base['overhead_s']:.1f} s -> {warm['overhead_s']:.1f} s), round {warm['round_s'] / base['round_s']:.2f}")
    print("overhead = round wall time - slowest client's training; parts: the last reply's path (module docstring), "
          "means over rounds 2..N; ratio = reply bytes / (M x bits / 8)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
