"""The GDM as a search for FIMI's time split, against the searches with a known optimum.

    python bench/bench_time_split.py                    # about 15 minutes on 2 shared cores
    python bench/bench_time_split.py --quick            # a smoke run, figures meaningless
    python bench/bench_time_split.py --out runs/time_split   # where the JSON and markdown go

For N = 5, 20, 200 devices (fimi preset): train [GenMEN]'s GDM policy on drawn scenarios
(strategies/learned/time_split.py), then on held-out scenario seeds 0..K-1 (training draws
seeds >= 1e6) solve every scenario's eta with the GDM (one sample, and the best of 16), the
Lagrangian search (the default, the KKT point), [FIMI]'s cross-entropy search, feasible_start
(the best of 49 splits on one line: the Lagrangian search's start and the reward's E_ref) and
SLSQP on P1 (reference.py, one start, on the first few seeds; not at 200 devices, where one
start ran over 7 minutes without finishing). Energy is reported as E / E_lagrangian (>= 1 by
optimality; a ratio is over the scenarios the search solved), wall time as seconds per solve,
everything measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies.allocation.fimi import (CrossEntropySettings, SearchTrace, feasible_start,  # noqa: E402
                                        round_energy, search_time_split)
from strategies.allocation.reference import solve_reference  # noqa: E402
from strategies.learned.time_split import GdmTimeSplit, problem_for, train_time_split_gdm  # noqa: E402

# (devices, training episodes, held-out seeds, seeds for SLSQP), sized to run in about 15
# minutes on 2 shared cores: the 200-device training is shorter because an episode there costs
# ~0.1 s of scenario drawing and solving, and an update several times more than at 20 devices.
FULL = [(5, 2400, 20, 3), (20, 2400, 20, 3), (200, 400, 10, 0)]
QUICK = [(5, 200, 3, 1), (20, 200, 3, 1), (200, 48, 2, 0)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def energy_of(problem, eta) -> float:
    return float(round_energy(problem, eta)[0]) if eta is not None else float("inf")


def measure(devices: int, env_steps: int, seeds: int, slsqp_seeds: int) -> dict:
    train_s, policy = timed(lambda: train_time_split_gdm(devices, env_steps, seed=0))
    best_of = GdmTimeSplit(policy.actor, devices, samples=16, seed=0, env_steps=policy.env_steps)
    searches = {"gdm": policy, "gdm-best-of-16": best_of, "lagrangian": "lagrangian", "ce": "ce"}
    rows = {name: {"energy": [], "seconds": []} for name in [*searches, "feasible_start", "slsqp"]}
    for seed in range(seeds):
        problem = problem_for(devices, seed)
        for name, search in searches.items():
            seconds, eta = timed(lambda: search_time_split(problem, search, np.random.default_rng(seed),
                                                           CrossEntropySettings(), SearchTrace()))
            rows[name]["energy"].append(energy_of(problem, eta))
            rows[name]["seconds"].append(seconds)
        seconds, eta = timed(lambda: feasible_start(problem))
        rows["feasible_start"]["energy"].append(energy_of(problem, eta))
        rows["feasible_start"]["seconds"].append(seconds)
        if seed < slsqp_seeds:
            reference = solve_reference(problem, starts=1, seed=seed)
            rows["slsqp"]["energy"].append(reference.energy)
            rows["slsqp"]["seconds"].append(reference.seconds)
    optimum = np.array(rows["lagrangian"]["energy"])
    summary = {}
    for name, row in rows.items():
        if not row["energy"]:
            summary[name] = None
            continue
        energy = np.array(row["energy"])
        ratio = energy / optimum[:len(energy)]
        solved = np.isfinite(ratio)
        summary[name] = {"scenarios": len(energy), "feasible": float(solved.mean()),
                         "ratio_mean": float(ratio[solved].mean()) if solved.any() else None,
                         "ratio_worst": float(ratio[solved].max()) if solved.any() else None,
                         "ratio_best": float(ratio[solved].min()) if solved.any() else None,
                         "seconds_per_solve": float(np.mean(row["seconds"]))}
    return {"devices": devices, "train_episodes": policy.env_steps, "train_seconds": train_s,
            "held_out_seeds": seeds, "searches": summary}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.6f}"


def markdown(results: list[dict]) -> str:
    lines = ["| N | search | feasible | E / E_lagrangian mean | worst | s per solve |",
             "|---:|---|---:|---:|---:|---:|"]
    for result in results:
        for name, s in result["searches"].items():
            if s is None:
                lines.append(f"| {result['devices']} | {name} | not run | | | |")
                continue
            lines.append(f"| {result['devices']} | {name} | {s['feasible']:.0%} of {s['scenarios']} | "
                         f"{fmt(s['ratio_mean'])} | {fmt(s['ratio_worst'])} | {s['seconds_per_solve']:.4f} |")
    lines.append("")
    for result in results:
        lines.append(f"- N = {result['devices']}: GDM trained on {result['train_episodes']} episodes in "
                     f"{result['train_seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_time_split"))
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)  # 2 threads on 2 shared cores ran several times slower (thread waits)
    results = []
    for devices, env_steps, seeds, slsqp_seeds in (QUICK if args.quick else FULL):
        print(f"== {devices} devices: training on {env_steps} episodes ==", flush=True)
        results.append(measure(devices, env_steps, seeds, slsqp_seeds))
        print(markdown(results[-1:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_split.json").write_text(json.dumps({"quick": args.quick, "results": results}, indent=1))
    (args.out / "time_split.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out / 'time_split.json'} and {args.out / 'time_split.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
