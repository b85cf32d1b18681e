"""[FIMI]'s tables and figures from a `fedfill reproduce` directory: [FIMI Table I] (Markdown and
JSON), [FIMI Fig. 4]'s accuracy against energy and time, [FIMI Fig. 5e]'s ablations and [FIMI Fig. 5f-g]'s
Delta_max and T_max sweeps. Each reads the runs' own reports (rounds.csv, clsd.json), so it
can be redrawn from a finished directory without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from commands.compare import costs_at_target
from server.report import read_rounds

TABLE_METHODS = ("tfl", "semi", "hdc", "sst", "gan", "clsd", "fimi")  # [FIMI Table I]'s rows, in its order
COSTS = ("energy_at_target_j", "latency_at_target_s", "uplink_at_target_bytes")


def split_name(alpha: float) -> str:
    """The directory of a split's runs in a campaign (commands.reproduce writes them there)."""
    return f"split-{alpha:g}"


def _split_key(alpha: float) -> str:
    return f"{alpha:g}"


def method_figures(run_dir: Path, target: float) -> dict | None:
    """[FIMI Table I]'s entry of one run (None where the run has no report)."""
    if (run_dir / "clsd.json").exists():  # centralised: an accuracy, no device costs
        best = json.loads((run_dir / "clsd.json").read_text())["best_accuracy"]
        return {"best_accuracy": best, **dict.fromkeys(COSTS), "rounds_to_target": None}
    if not (run_dir / "rounds.csv").exists():
        return None
    return costs_at_target(read_rounds(run_dir / "rounds.csv"), target)


def table1(root: Path, splits, target: float) -> dict:
    out = {"target_accuracy": target, "splits": {}}
    for alpha in splits:
        entries = {}
        for method in TABLE_METHODS:
            figures = method_figures(root / split_name(alpha) / method, target)
            if figures is not None:
                entries[method] = figures
        out["splits"][_split_key(alpha)] = entries
    return out


def table1_markdown(table: dict) -> str:
    """[FIMI Table I]'s layout: per split Energy@x, Latency@x, Uplink@x with x-fold ratios to TFL, and Best Acc."""
    x = f"{table['target_accuracy']:.0%}"
    lines = []
    for split, entries in table["splits"].items():
        base = entries.get("tfl") or {}
        lines += [f"### Dir({split})", "",
                  f"| method | Energy@{x} (J) | Latency@{x} (h) | Uplink@{x} (MB) | rounds | Best Acc. |",
                  "|---|---|---|---|---|---|"]

        def cell(entry, key, scale, fmt):
            value = entry.get(key)
            if value is None:
                return "N/A"
            text = fmt.format(value * scale)
            return text + (f" ({value / base[key]:.1f}x)" if base.get(key) else "")

        for method, entry in entries.items():
            best = entry.get("best_accuracy")
            lines.append(f"| {method.upper()} | {cell(entry, 'energy_at_target_j', 1, '{:.4g}')} | "
                         f"{cell(entry, 'latency_at_target_s', 1 / 3600, '{:.3g}')} | "
                         f"{cell(entry, 'uplink_at_target_bytes', 1e-6, '{:.1f}')} | "
                         f"{entry['rounds_to_target'] if entry.get('rounds_to_target') is not None else 'N/A'} | "
                         f"{'N/A' if best is None else f'{best:.2%}'} |")
        lines.append("")
    lines.append("N/A: the target was never reached within the rounds run (CLSD trains centrally: no device costs).")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fig4(root: Path, splits, target: float, path: Path) -> None:
    """[FIMI Fig. 4]: test accuracy against cumulative device energy (top) and latency (bottom), per split."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(splits), figsize=(5.5 * len(splits), 8), squeeze=False)
    for col, alpha in enumerate(splits):
        for method in TABLE_METHODS:
            run_dir = root / split_name(alpha) / method
            if (run_dir / "clsd.json").exists():
                best = json.loads((run_dir / "clsd.json").read_text())["best_accuracy"]
                for row in range(2):
                    axes[row][col].axhline(best, color="black", ls=":", lw=1, label="CLSD (best, centralised)")
                continue
            if not (run_dir / "rounds.csv").exists():
                continue
            rows = read_rounds(run_dir / "rounds.csv")
            accuracy = [r["accuracy"] for r in rows]
            axes[0][col].plot([r["energy_j"] for r in rows], accuracy, label=method.upper())
            axes[1][col].plot([r["latency_s"] / 3600 for r in rows], accuracy, label=method.upper())
        axes[0][col].set(title=f"Dir({alpha:g})", xlabel="cumulative device energy (J, cost model)")
        axes[1][col].set(xlabel="cumulative latency (h, cost model)")
        for row in range(2):
            ax = axes[row][col]
            ax.axhline(target, color="grey", lw=0.8, ls="--")
            ax.set_ylabel("global test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save(fig, path)


def ablation_figures(variants: dict[str, Path], target: float) -> dict:
    """label -> [FIMI Table I]'s entry of each variant's run (FIMI's first), those with a report."""
    out = {label: method_figures(run_dir, target) for label, run_dir in variants.items()}
    return {label: figures for label, figures in out.items() if figures is not None}


def plot_bars(figures: dict, target: float, title: str, path: Path) -> None:
    """Energy to the target and best accuracy per variant, N/A written where never reached."""
    plt = _plt()
    labels = list(figures)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    energy = [figures[k]["energy_at_target_j"] for k in labels]
    axes[0].bar(labels, [e or 0 for e in energy], color="tab:orange")
    for i, e in enumerate(energy):
        if e is None:
            axes[0].text(i, 0, "N/A", ha="center", va="bottom")
    axes[0].set_ylabel(f"device energy to {target:.0%} accuracy (J)")
    axes[1].bar(labels, [figures[k]["best_accuracy"] for k in labels], color="tab:blue")
    axes[1].set_ylim(min(figures[k]["best_accuracy"] for k in labels) - 0.05, 1.0)
    axes[1].set_ylabel("best test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    _save(fig, path)


def sweep_figures(runs: dict, target: float) -> dict:
    out = {}
    for value, run_dir in runs.items():
        if not (run_dir / "rounds.csv").exists():
            continue
        rows = read_rounds(run_dir / "rounds.csv")
        figures = costs_at_target(rows, target)
        plan = run_dir / "plan_round_1.json"
        notes = json.loads(plan.read_text()).get("notes", []) if plan.exists() else []
        out[f"{value:g}"] = {**figures, "synthetic_per_round": rows[-1]["synthetic_used"] if rows else None,
                             "energy_j": rows[-1]["energy_j"], "latency_s": rows[-1]["latency_s"], "notes": notes}
    return out


def plot_delta_max(runs: dict, figures: dict, path: Path) -> None:
    """[FIMI Fig. 5f]: accuracy over rounds per Delta_max, and the synthetic data each asked for."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for value, run_dir in runs.items():
        if f"{value:g}" not in figures:
            continue
        rows = read_rounds(run_dir / "rounds.csv")
        axes[0].plot([r["round"] for r in rows], [r["accuracy"] for r in rows], label=f"Δmax {value:g}")
        axes[1].plot([r["round"] for r in rows[1:]], [r["synthetic_used"] for r in rows[1:]], label=f"Δmax {value:g}")
    axes[0].set(xlabel="round", ylabel="global test accuracy")
    axes[1].set(xlabel="round", ylabel="synthetic samples trained on (all devices)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_t_max(figures: dict, target: float, path: Path) -> None:
    """[FIMI Fig. 5g]: energy and latency to the target against the round's latency budget."""
    plt = _plt()
    points = sorted((float(v), f) for v, f in figures.items())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    t = [v for v, _ in points]
    axes[0].plot(t, [f["energy_at_target_j"] if f["energy_at_target_j"] is not None else float("nan")
                     for _, f in points], marker="o", color="tab:orange")
    axes[0].set_ylabel(f"device energy to {target:.0%} accuracy (J)")
    axes[1].plot(t, [f["latency_at_target_s"] / 3600 if f["latency_at_target_s"] is not None else float("nan")
                     for _, f in points], marker="o", color="tab:green")
    axes[1].set_ylabel(f"latency to {target:.0%} accuracy (h)")
    for ax in axes:
        ax.set_xlabel("T_max (s)")
        ax.grid(alpha=0.3)
    _save(fig, path)


def write_evaluation(root: Path, splits, target: float, variants: dict[str, Path],
                     sweeps: dict[str, dict[float, Path]], sweep_split: float) -> list[str]:
    """Every table and figure the campaign's runs allow; returns the files written.
    `variants`: [FIMI Fig. 5e]'s label -> run directory; `sweeps`: "delta_max" and "t_max_s", each
    value -> run directory."""
    written = []
    table = table1(root, splits, target)
    (root / "table1.json").write_text(json.dumps(table, indent=1) + "\n")
    (root / "table1.md").write_text(table1_markdown(table))
    written += ["table1.json", "table1.md"]
    plot_fig4(root, splits, target, root / "fig4_accuracy.png")
    written.append("fig4_accuracy.png")
    ablation = ablation_figures(variants, target)
    if len(ablation) > 1:
        (root / "fig5e_ablation.json").write_text(json.dumps(ablation, indent=1) + "\n")
        plot_bars(ablation, target, f"Ablations of FIMI, Dir({sweep_split:g})", root / "fig5e_ablation.png")
        written += ["fig5e_ablation.json", "fig5e_ablation.png"]
    for setting, name in (("delta_max", "fig5f_delta_max"), ("t_max_s", "fig5g_t_max")):
        runs = sweeps.get(setting, {})
        figures = sweep_figures(runs, target)
        if len(figures) < 2:
            continue
        (root / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
        if setting == "delta_max":
            plot_delta_max(runs, figures, root / f"{name}.png")
        else:
            plot_t_max(figures, target, root / f"{name}.png")
        written += [f"{name}.json", f"{name}.png"]
    return written


def _spread(values: list[float]) -> dict | None:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else None


def _over_seeds(entries: list[dict]) -> dict:
    """One method's (or ablation's) Table I entries, one per seed, as counts and spreads."""
    reached = [e for e in entries if e["rounds_to_target"] is not None]
    return {"seeds_run": len(entries), "seeds_reached": len(reached),
            "rounds_to_target": _spread([e["rounds_to_target"] for e in reached]),
            "energy_at_target_j": _spread([e["energy_at_target_j"] for e in reached
                                           if e["energy_at_target_j"] is not None])}


def across_seeds(tables: dict[int, dict], ablations: dict[int, dict]) -> dict:
    """Table I and the ablations over several seeds' campaigns: per method, how many seeds reached
    the target, and the mean, min and max of its rounds, its energy against the same seed's TFL
    (a seed is its own baseline: its split and draws differ) and its best accuracy.
    `tables`: seed -> that campaign's table1.json; `ablations`: seed -> its fig5e_ablation.json."""
    seeds = sorted(tables)
    out = {"seeds": seeds, "target_accuracy": tables[seeds[0]]["target_accuracy"], "splits": {}, "ablations": {}}
    for split in dict.fromkeys(s for seed in seeds for s in tables[seed]["splits"]):
        rows = {}
        for method in TABLE_METHODS:
            entries = {seed: tables[seed]["splits"].get(split, {}).get(method) for seed in seeds}
            entries = {seed: e for seed, e in entries.items() if e is not None and e.get("best_accuracy") is not None}
            if not entries:
                continue
            ratios = []
            for seed, e in entries.items():
                tfl = tables[seed]["splits"][split].get("tfl") or {}
                if e["rounds_to_target"] is not None and tfl.get("energy_at_target_j"):
                    ratios.append(e["energy_at_target_j"] / tfl["energy_at_target_j"])
            rows[method] = {**_over_seeds(list(entries.values())), "energy_vs_tfl": _spread(ratios),
                            "best_accuracy": _spread([e["best_accuracy"] for e in entries.values()])}
        out["splits"][split] = rows
    for label in dict.fromkeys(v for seed in seeds for v in ablations.get(seed, {})):
        out["ablations"][label] = _over_seeds([a[label] for a in ablations.values() if label in a])
    return out


def across_seeds_markdown(summary: dict) -> str:
    """Each figure as its mean over the seeds that reached the target, then (min-max)."""
    x = f"{summary['target_accuracy']:.0%}"
    n = len(summary["seeds"])

    def spread(s: dict | None, fmt: str, scale: float = 1.0, range_fmt: str = "") -> str:
        if s is None:
            return "N/A"
        low, high = ((range_fmt or fmt).format(s[end] * scale) for end in ("min", "max"))
        return fmt.format(s["mean"] * scale) + ("" if low == high else f" ({low}-{high})")

    lines = [f"Seeds {', '.join(map(str, summary['seeds']))}: the mean over the seeds that reached {x}, "
             "then (min-max); energy against the same seed's TFL.", ""]
    for split, rows in summary["splits"].items():
        lines += [f"### Dir({split})", "",
                  f"| method | reached {x} | rounds | energy vs TFL | energy (J) | best acc. |",
                  "|---|---|---|---|---|---|"]
        for method, r in rows.items():
            lines.append(f"| {method.upper()} | {r['seeds_reached']}/{r['seeds_run']} | "
                         f"{spread(r['rounds_to_target'], '{:.1f}', 1, '{:.0f}')} | {spread(r['energy_vs_tfl'], '{:.2f}x')} | "
                         f"{spread(r['energy_at_target_j'], '{:.3f}')} | {spread(r['best_accuracy'], '{:.1f}%', 100)} |")
        lines.append("")
    if summary["ablations"]:
        lines += ["### Ablations [FIMI Fig. 5e]", "", f"| variant | reached {x} | rounds | energy (J) |",
                  "|---|---|---|---|"]
        for label, r in summary["ablations"].items():
            lines.append(f"| {label} | {r['seeds_reached']}/{r['seeds_run']} | "
                         f"{spread(r['rounds_to_target'], '{:.1f}', 1, '{:.0f}')} | {spread(r['energy_at_target_j'], '{:.3f}')} |")
        lines.append("")
    if any(r["seeds_run"] < n for rows in summary["splits"].values() for r in rows.values()):
        lines.append(f"A method with fewer than {n} seeds run is missing from some seeds' campaigns.")
    return "\n".join(lines) + "\n"


def write_across_seeds(root: Path, seed_dirs: dict[int, Path]) -> list[str]:
    """seeds.json and seeds.md in `root`, from the seeds' finished campaign directories."""
    tables = {seed: json.loads((d / "table1.json").read_text()) for seed, d in seed_dirs.items()
              if (d / "table1.json").exists()}
    if not tables:
        return []
    ablations = {seed: json.loads((d / "fig5e_ablation.json").read_text()) for seed, d in seed_dirs.items()
                 if (d / "fig5e_ablation.json").exists()}
    summary = across_seeds(tables, ablations)
    (root / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    (root / "seeds.md").write_text(across_seeds_markdown(summary))
    return ["seeds.json", "seeds.md"]
