"""`fedfill compare`: run several policies on the same split and seed.

The classifier job tabulates [FIMI Table I] — energy, latency and uplink spent until the
global accuracy first reaches the target, and the best accuracy — with one plot for all
policies and [FIMI Fig. 5b]'s per-device view. The ddpm job tabulates [ODQ]'s comparison: per
scheme the generator's quality at round 0 and at the end, the energy and bytes spent, the
worst measured/demanded quantization error, with [ODQ Fig. 2]'s quality-and-energy bars and
[ODQ Fig. 4]'s energy against the latency budget.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedfill.config import GIVEN
from fedfill.errors import UsageError
from server.report import GENERATION_COLUMNS, read_rounds


def add_arguments(parser) -> None:
    from commands import run as run_command

    run_command.add_arguments(parser)
    parser.set_defaults(out="runs/compare")
    parser.add_argument("--policies", help="comma-separated policies (default: " + "; ".join(
        f"{', '.join(p)} for --job {job}" for job, p in DEFAULT_POLICIES.items()) + ")")
    parser.add_argument("--target", type=float, default=0.8,
                        help="target of the headline metric: global test accuracy, or the ddpm job's class fidelity "
                             "(default: 0.8)")


DEFAULT_POLICIES = {"classifier": ("tfl", "hdc", "fimi"), "ddpm": ("fp32", "fixed-8", "fixed-6", "ondemand")}
HEADLINE = {"classifier": "accuracy", "ddpm": "fidelity"}


def costs_at_target(rows: list[dict], target: float, metric: str = "accuracy") -> dict:
    """Cumulative costs at the first round whose headline metric reaches the target (None if never)."""
    trained = [r for r in rows if r["round"] > 0]
    best = max((r[metric] for r in trained), default=None)
    hit = next((r for r in trained if r[metric] >= target), None)
    return {f"best_{metric}": best,
            "energy_at_target_j": hit["energy_j"] if hit else None,
            "latency_at_target_s": hit["latency_s"] if hit else None,
            "uplink_at_target_bytes": int(hit["uplink_bytes"]) if hit else None,
            "rounds_to_target": int(hit["round"]) if hit else None}


def run(args) -> int:
    from commands import run as run_command

    from strategies.allocation.policies import parse_policy

    policies = [p.strip() for p in (args.policies or ",".join(DEFAULT_POLICIES[args.job])).split(",") if p.strip()]
    if not policies:
        raise UsageError("--policies names no policy")
    for policy in policies:
        try:
            parse_policy(policy)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if len(set(policies)) < len(policies):
        raise UsageError(f"--policies {args.policies}: a policy named twice (each one's report goes to OUT/POLICY)")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target is a {HEADLINE[args.job]} in (0, 1], got {args.target}")
    out = Path(args.out).resolve()
    metric = HEADLINE[args.job]
    runs = {policy: policy_run_args(args, policy, out) for policy in policies}
    for policy_args in runs.values():  # every run checked before the first one starts
        run_command.checked_job(policy_args)
    results = {}
    for policy, policy_args in runs.items():
        if run_command.run(policy_args) != 0:
            print(f"fedfill compare: the {policy} run failed; see {out / policy / 'flwr.log'}")
            return 1
        rows = read_rounds(out / policy / "rounds.csv")
        results[policy] = {**costs_at_target(rows, args.target, metric), "fill": fill_figures(rows)}
        if args.job == "ddpm":
            results[policy].update(diffusion_figures(out / policy))
    summary = {f"target_{metric}": args.target, "job": args.job, "dataset": args.dataset, "delivery": args.delivery,
               "alpha": args.dirichlet_alpha,
               "seed": args.seed, "rounds": args.rounds, "nodes": args.num_partitions, "policies": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_policies(out, policies, args.target, metric)
    if args.job == "ddpm":
        print_diffusion_table(summary)
        plot_schemes(out, summary)
        plot_energy_against_budget(out, policies)
        print(f"compare: {out}/summary.json, schemes.png, energy_vs_tmax.png, policies.png")
        return 0
    print_table(summary)
    if "fimi" in policies:
        plot_synthetic_per_device(out / "fimi", out / "fimi_devices.png")
    print(f"compare: {out}/summary.json, policies.png" + (", fimi_devices.png" if "fimi" in policies else ""))
    return 0


def fill_figures(rows: list[dict]) -> dict:
    """What generating the run's synthetic samples cost, over all its rounds (rounds.csv's
    gen_* columns): where the sampling ran, the bytes it took to the devices, the devices'
    modeled energy for it. Older reports, without the columns, give zeros."""
    return {column: sum(row.get(column) or 0 for row in rows) for column in GENERATION_COLUMNS}


def policy_run_args(args, policy: str, out: Path) -> argparse.Namespace:
    """`fedfill run`'s arguments for one policy of the comparison, its report in OUT/POLICY.
    Under --resume a policy whose run never saved a checkpoint starts afresh, so an
    interrupted comparison continues where it stopped."""
    resume = bool(args.resume) and (out / policy / "checkpoint.npz").exists()
    policy_args = argparse.Namespace(**{**vars(args), "policy": policy, "out": str(out / policy), "resume": resume})
    setattr(policy_args, GIVEN, {*getattr(args, GIVEN, set()), "policy"})  # the job's default must not win
    return policy_args


def diffusion_figures(run_dir: Path) -> dict:
    """A ddpm run's quality at round 0 and at the end, its cumulative costs, and the worst
    measured / demanded quantization error over its devices and rounds."""
    from server.report import NODES_CSV, read_nodes

    rows = read_rounds(run_dir / "rounds.csv")
    first, last = rows[0], rows[-1]
    out = {f"{key}_{when}": row.get(key) for key in ("frechet", "fidelity", "frechet_unseen", "fidelity_unseen")
           for when, row in (("start", first), ("end", last))}
    out.update(energy_j=last["energy_j"], uplink_bytes=int(last["uplink_bytes"]), latency_s=last["latency_s"])
    devices = read_nodes(run_dir / NODES_CSV) if (run_dir / NODES_CSV).exists() else []
    ratios = [d["error_measured"] / d["error_demand"] for d in devices
              if d.get("error_demand") and d.get("error_measured") is not None]
    out["max_error_ratio"] = max(ratios, default=None)  # measured / demanded; None where no device had a demand
    out["bits_sent"] = sorted({int(d["bits"]) for d in devices if d.get("bits") is not None})
    return out


def print_diffusion_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ddpm fine-tuning on {summary['dataset']}, Dir({summary['alpha']}), {summary['nodes']} "
                        f"devices, {summary['rounds']} rounds (Fréchet: lower is better)")
    for column in ("policy", "bits sent", "Fréchet start -> end", "fidelity start -> end", "unseen fidelity",
                   "energy J", "uplink MB", "max error / demand"):
        table.add_column(column, justify="right")
    for name, r in summary["policies"].items():
        ratio = r.get("max_error_ratio")
        table.add_row(name, ",".join(map(str, r["bits_sent"])), f"{r['frechet_start']:.3f} -> {r['frechet_end']:.3f}",
                      f"{r['fidelity_start']:.1%} -> {r['fidelity_end']:.1%}",
                      f"{r['fidelity_unseen_start']:.1%} -> {r['fidelity_unseen_end']:.1%}",
                      f"{r['energy_j']:.4g}", f"{r['uplink_bytes'] / 1e6:.2f}", "-" if ratio is None else f"{ratio:.3f}")
    Console(width=160).print(table)


def plot_schemes(out: Path, summary: dict) -> None:
    """[ODQ Fig. 2]: each scheme's final quality beside the device energy it spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["policies"])
    results = [summary["policies"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(names))
    axes[0].bar(x, [r["frechet_end"] for r in results], color="tab:blue")
    axes[0].axhline(results[0]["frechet_start"], color="grey", ls="--", lw=0.8, label="round 0 (the start)")
    axes[0].set_ylabel("Fréchet distance, reference features (lower is better)")
    axes[1].bar(x, [r["fidelity_unseen_end"] for r in results], color="tab:green")
    axes[1].axhline(results[0]["fidelity_unseen_start"], color="grey", ls="--", lw=0.8, label="round 0 (the start)")
    axes[1].set_ylabel("class fidelity on the classes the start never saw")
    axes[2].bar(x, [r["energy_j"] for r in results], color="tab:orange")
    axes[2].set_ylabel("cumulative device energy (J, ODQ's energy model)")
    for ax in axes:
        ax.set_xticks(list(x), names)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{summary['nodes']} devices, {summary['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(out / "schemes.png", dpi=110)
    plt.close(fig)


def plot_energy_against_budget(out: Path, policies: list[str], budgets=None) -> None:
    """[ODQ Fig. 4]: a round's planned device energy against the latency budget T_max,
    per scheme, on the run's own devices (the planner alone, on system.json and profiles.json
    of the first run: the bits of `ondemand` rest on the codec constant's prior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from strategies.allocation import parse_scenario, solve_plan

    system = json.loads((out / policies[0] / "system.json").read_text())
    profiles = json.loads((out / policies[0] / "profiles.json").read_text())
    devices = [{**p, "id": node} for node, p in profiles.items()]
    budgets = budgets if budgets is not None else np.linspace(0.2, 2.0, 10) * system["t_max_s"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for policy in policies:
        energy = []
        for t_max in budgets:
            plan = solve_plan(parse_scenario({"system": {**system, "t_max_s": float(t_max)}, "devices": devices}),
                              policy)
            energy.append(plan.energy_j if plan.feasible else np.nan)
        ax.plot(budgets, energy, marker=".", label=policy)
    ax.set(yscale="log", xlabel="latency budget T_max (s)", ylabel="planned device energy per round (J)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "energy_vs_tmax.png", dpi=110)
    plt.close(fig)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    target = summary["target_accuracy"]
    table = Table(title=f"{summary['dataset']}, Dir({summary['alpha']}), {summary['nodes']} nodes, "
                        f"{summary['rounds']} rounds, target {target:.0%}; fill: generating the synthetic samples "
                        f"({summary.get('delivery', 'image')} delivery)")
    for column in ("policy", f"Energy@{target:.0%} J", f"Latency@{target:.0%} h", f"Uplink@{target:.0%} MB",
                   "rounds", "Best acc", "fill: server s", "fill: downlink kB", "fill: device J"):
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
                      "N/A" if r["best_accuracy"] is None else f"{r['best_accuracy']:.2%}",
                      f"{r['fill']['gen_server_seconds']:.2f}", f"{r['fill']['gen_downlink_bytes'] / 1e3:.1f}",
                      f"{r['fill']['gen_device_energy_j']:.4g}")
    Console(width=170).print(table)


def plot_policies(out: Path, policies: list[str], target: float, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        rows = read_rounds(out / policy / "rounds.csv")
        acc = [r[metric] for r in rows]
        axes[0].plot([r["energy_j"] for r in rows], acc, label=policy)
        axes[1].plot([r["latency_s"] / 3600 for r in rows], acc, label=policy)
    axes[0].set_xlabel("cumulative device energy (J, cost model)")
    axes[1].set_xlabel("cumulative latency (h, cost model)")
    for ax in axes:
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("global test accuracy" if metric == "accuracy" else metric.replace("_", " "))
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
    """[FIMI Fig. 5b]: synthetic samples each device was planned against its eps and its distance."""
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

