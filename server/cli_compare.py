"""`fedfill compare`: run several policies on the same split and seed and tabulate seed 003's
Table I — energy, latency and uplink spent until the global accuracy first reaches the
target, and the best accuracy — with one plot for all policies and Fig. 5b's per-device view.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedfill.errors import UsageError
from server.report import read_rounds
from strategies.allocation.presets import fimi_path_gain


def add_arguments(parser) -> None:
    from server import cli_run

    cli_run.add_arguments(parser)
    parser.set_defaults(out="runs/compare")
    parser.add_argument("--policies", default="tfl,hdc,fimi", help="comma-separated policies (default: tfl,hdc,fimi)")
    parser.add_argument("--target", type=float, default=0.8, help="target global test accuracy (default: 0.8)")


def costs_at_target(rows: list[dict], target: float) -> dict:
    """Cumulative costs at the first round whose accuracy reaches the target (None if never)."""
    trained = [r for r in rows if r["round"] > 0]
    best = max((r["accuracy"] for r in trained), default=None)
    hit = next((r for r in trained if r["accuracy"] >= target), None)
    return {"best_accuracy": best,
            "energy_at_target_j": hit["energy_j"] if hit else None,
            "latency_at_target_s": hit["latency_s"] if hit else None,
            "uplink_at_target_bytes": int(hit["uplink_bytes"]) if hit else None,
            "rounds_to_target": int(hit["round"]) if hit else None}


def run(args) -> int:
    from server import cli_run

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from strategies.allocation import POLICIES as allowed

    unknown = [p for p in policies if p not in allowed]
    if unknown or not policies:
        raise UsageError(f"unknown policy {unknown[0] if unknown else ''!r}; choose from {', '.join(allowed)}")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target is an accuracy in (0, 1], got {args.target}")
    out = Path(args.out).resolve()
    results = {}
    for policy in policies:
        policy_args = argparse.Namespace(**{**vars(args), "policy": policy, "out": str(out / policy)})
        if cli_run.run(policy_args) != 0:
            print(f"fedfill compare: the {policy} run failed; see {out / policy / 'flwr.log'}")
            return 1
        results[policy] = costs_at_target(read_rounds(out / policy / "rounds.csv"), args.target)
    summary = {"target_accuracy": args.target, "dataset": args.dataset, "alpha": args.dirichlet_alpha, "seed": args.seed,
               "rounds": args.rounds, "nodes": args.num_partitions, "policies": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    plot_policies(out, policies, args.target)
    if "fimi" in policies:
        plot_synthetic_per_device(out / "fimi", out / "fimi_devices.png")
    print(f"compare: {out}/summary.json, policies.png" + (", fimi_devices.png" if "fimi" in policies else ""))
    return 0


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    target = summary["target_accuracy"]
    table = Table(title=f"{summary['dataset']}, Dir({summary['alpha']}), {summary['nodes']} nodes, "
                        f"{summary['rounds']} rounds, target {target:.0%}")
    for column in ("policy", f"Energy@{target:.0%} J", f"Latency@{target:.0%} h", f"Uplink@{target:.0%} MB",
                   "rounds", "Best acc"):
        table.add_column(column, justify="right")
    base = summary["policies"].get("tfl")

    def cell(value, key, scale=1.0, fmt="{:.3f}"):
        if value is None:
            return "N/A"
        text = fmt.format(value * scale)
        if base and base.get(key):
            text += f" ({value / base[key]:.2f}x)"
        return text

    for name, r in summary["policies"].items():
        table.add_row(name, cell(r["energy_at_target_j"], "energy_at_target_j"),
                      cell(r["latency_at_target_s"], "latency_at_target_s", 1 / 3600),
                      cell(r["uplink_at_target_bytes"], "uplink_at_target_bytes", 1e-6, "{:.1f}"),
                      "N/A" if r["rounds_to_target"] is None else str(r["rounds_to_target"]),
                      "N/A" if r["best_accuracy"] is None else f"{r['best_accuracy']:.2%}")
    Console(width=140).print(table)


def plot_policies(out: Path, policies: list[str], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        rows = read_rounds(out / policy / "rounds.csv")
        acc = [r["accuracy"] for r in rows]
        axes[0].plot([r["energy_j"] for r in rows], acc, label=policy)
        axes[1].plot([r["latency_s"] / 3600 for r in rows], acc, label=policy)
    axes[0].set_xlabel("cumulative device energy (J, cost model)")
    axes[1].set_xlabel("cumulative latency (h, cost model)")
    for ax in axes:
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("global test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "policies.png", dpi=110)
    plt.close(fig)


def distance_from_gain(gain: float) -> float:
    """Inverse of the 128.1 + 37.6 log10(R km) path loss, in metres."""
    loss_db = -10.0 * math.log10(gain)
    return 1000.0 * 10 ** ((loss_db - 128.1) / 37.6)


def plot_synthetic_per_device(run_dir: Path, path: Path) -> None:
    """Fig. 5b: synthetic samples each device was planned against its eps and its distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = json.loads((run_dir / "plan_round_1.json").read_text())
    profiles = json.loads((run_dir / "profiles.json").read_text())
    if not plan.get("feasible"):
        return
    eps, distance, d_gen = [], [], []
    for node_id, device in zip(plan["node_ids"], plan["devices"]):
        profile = profiles[str(node_id)]
        eps.append(profile["eps"])
        distance.append(distance_from_gain(profile["gain"]))
        d_gen.append(device["d_gen"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].scatter(eps, d_gen)
    axes[0].set_xlabel("energy coefficient eps")
    axes[1].scatter(distance, d_gen)
    axes[1].set_xlabel("distance to the server (m)")
    for ax in axes:
        ax.set_ylabel("planned synthetic samples (round 1)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

