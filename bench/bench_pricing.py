"""[GenMEN]'s pricing game measured: the exact solver against brute force, and the learned
leaders (the paper's GDM policy, PPO, a random price) against the exact optimum.

    python bench/bench_pricing.py [--steps 4000] [--seeds 3] [--devices 5,10,20]
                                  [--held-out 100] [--plot FILE.png] [--json FILE]

1. Exact solver: on 100 random games (5, 10, 20 devices; continuous and whole units) the best
   of a 100,001-price grid never beats it; the worst gap either way.
2. Learned leaders, trained for --steps environment steps on games whose thetas are private
   (the design note's reproduction table: capacity U(3, 6), theta U(0.5, 2), 12 units, server
   cost 0.6, revenue 40), one seed at a time: the leader's utility on 30 evaluation games
   against steps (the paper's Fig. 4, plus the exact optimum as a line, which the paper does
   not draw), and the regret (U* - U(p)) / (U* - U(0)) of its last price on --held-out new
   games. Beside them two baselines that need no learning: the best of the random prices an
   episode tried (the leader sees its own utility), and the best constant price for the
   distribution (found on 200 other games, knowing the distribution: what a policy that
   ignores its state can reach at most).
   Every learned leader's state holds, beside the last price and responses, the bounds on each
   device's entry price that all responses so far imply (strategies/learned/envs.py).
3. The GDM with [GenMEN]'s own state (the last price and responses only) and with its own
   reward (1 when the utility rose), beside the utility reward.
4. A wider prior, where a constant price is far from optimal: the worked example's public
   figures with each device's entry price drawn in 2%..60% of the server's cost.

Goal (issue "Priced offloading"): the GDM's mean regret on held-out games at most 0.10.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies.allocation.stackelberg import PricingGame, leader_utility, solve_price  # noqa: E402
from strategies.learned.envs import GameDraw, normalised_utility  # noqa: E402
from strategies.learned.pricers import play, regret, train_pricer  # noqa: E402

GOAL_REGRET = 0.10


def exact_against_grid(games: int = 100, seed: int = 0) -> dict:
    """Continuous games: the grid's best within 1e-6 relative. Whole-unit games: the optimum is a
    threshold, which a grid only brushes past, so there the gap is the grid's spacing at work."""
    rng = np.random.default_rng(seed)
    worst_beaten, worst_short = -np.inf, {"continuous": 0.0, "whole units": 0.0}
    for i in range(games):
        n = (5, 10, 20)[i % 3]
        game = PricingGame(theta=rng.uniform(0.2, 2.0, n), capacity=rng.uniform(1.0, 8.0, n),
                           unit_cost=rng.uniform(0.1, 0.6, n), fixed_cost=rng.uniform(0.0, 0.5, n),
                           units=rng.integers(4, 16, n), server_cost=float(rng.uniform(0.1, 1.0)), revenue=10.0,
                           integer=bool(i % 2))
        exact = solve_price(game).leader_utility
        grid = np.linspace(0.0, game.server_cost, 100_001)
        best = max(float(leader_utility(game, chunk).max()) for chunk in np.array_split(grid, 10))
        worst_beaten = max(worst_beaten, best - exact)  # > 0 would mean the grid beat the solver
        kind = "whole units" if game.integer else "continuous"
        worst_short[kind] = max(worst_short[kind], (exact - best) / abs(exact))
    return {"games": games, "grid_prices": 100_001, "worst_grid_minus_exact": worst_beaten,
            "worst_exact_above_grid_relative": worst_short}


def best_constant_price(draw: GameDraw, seed: int) -> float:
    """The price fraction q that maximises the mean normalised utility over 200 games of the
    distribution: the best a leader that ignores what it sees can do."""
    rng = np.random.default_rng(seed)
    games = [draw.draw(rng) for _ in range(200)]
    grid = np.linspace(0.0, 1.0, 1001)
    mean = np.mean([normalised_utility(g, grid * g.server_cost) for g in games], axis=0)
    return float(grid[int(np.argmax(mean))])


def best_constant_row(devices: int, draw: GameDraw, held_out: list, optimum: np.ndarray) -> dict:
    """The summary row of the best constant price on the held-out games."""
    q = best_constant_price(draw, seed=11)
    utility = np.array([normalised_utility(g, q * g.server_cost) for g in held_out])
    return summary(devices, f"best constant (q={q:.3f})", [regret(optimum, utility)], [0.0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="environment steps each learned leader trains for")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--devices", default="5,10,20", help="the device counts to train and hold out games for")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--curve-points", type=int, default=10, help="evaluations along each learning curve")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the learning curves (first device count)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    devices = [int(n) for n in args.devices.split(",")]
    report: dict = {"steps": args.steps, "seeds": args.seeds, "held_out": args.held_out}

    print("== 1. exact solver against a dense price grid ==")
    report["exact"] = exact = exact_against_grid()
    print(f"{exact['games']} games, {exact['grid_prices']:,} prices each: the grid's best minus the exact utility "
          f"is at most {exact['worst_grid_minus_exact']:.3g} (never above 0 means never beaten); the exact optimum "
          f"is above the grid's best by at most "
          + ", ".join(f"{v:.2g} ({k})" for k, v in exact["worst_exact_above_grid_relative"].items()) + " relative")

    print(f"\n== 2. learned leaders: {args.steps:,} steps, {args.seeds} seeds, regret on {args.held_out} held-out "
          f"games ==")
    curves: dict = {}
    rows = []
    for n in devices:
        draw = GameDraw(devices=n)
        rng = np.random.default_rng([7, n])
        held_out = [draw.draw(rng) for _ in range(args.held_out)]
        evaluation = [draw.draw(rng) for _ in range(30)]
        exact_mean = float(np.mean([solve_price(g).leader_utility for g in evaluation]))
        for kind in ("gdm", "ppo", "random"):
            per_seed, seconds, best_random = [], [], []
            for seed in range(args.seeds):
                curve = []

                def progress(steps, pricer, curve=curve):
                    final = play(pricer, evaluation, seed=pricer.seed + 1).prices[:, -1]
                    curve.append((steps, float(np.mean([leader_utility(g, q * g.server_cost)
                                                        for g, q in zip(evaluation, final)]))))

                started = time.perf_counter()
                pricer = train_pricer(kind, draw, args.steps if kind != "random" else 0, seed=seed,
                                      on_progress=progress if kind != "random" else None,
                                      progress_every=max(args.steps // args.curve_points, 1))
                seconds.append(time.perf_counter() - started)
                if kind == "random":  # nothing learns: the curve is a fresh random price at each point
                    for k in range(args.curve_points):
                        progress((k + 1) * args.steps // args.curve_points,
                                 train_pricer("random", draw, 0, seed=1000 * seed + k))
                rounds = play(pricer, held_out, seed=seed + 100)
                per_seed.append(rounds.regret)
                if kind == "random":
                    best_random.append(rounds.best_regret)
                if n == devices[0]:
                    curves.setdefault(kind, []).append(curve)
            rows.append(summary(n, kind, per_seed, seconds))
            if best_random:
                rows.append(summary(n, f"best of {pricer.horizon} random", best_random, [0.0]))
        rows.append(best_constant_row(n, draw, held_out, rounds.optimum))
        if n == devices[0]:
            report["curve_exact_mean"] = exact_mean
    report["regret"] = rows
    report["curves"] = curves
    print(f"{'devices':>7} {'leader':>22} | {'mean regret':>15} {'median':>7} {'p90':>6} | {'train s':>7}")
    for row in rows:
        print(f"{row['devices']:7d} {row['leader']:>22} | {row['mean']:7.4f} ± {row['spread']:<6.4f} "
              f"{row['median']:7.4f} {row['p90']:6.3f} | {row['train_seconds']:7.1f}")

    print(f"\n== 3. the GDM with [GenMEN]'s state and reward, {devices[0]} devices ==")
    draw = GameDraw(devices=devices[0])
    rng = np.random.default_rng([7, devices[0]])
    held_out = [draw.draw(rng) for _ in range(args.held_out)]
    report["paper"] = []
    for label, options in (("state: last price and responses", {"memory": False}),
                           ("reward: 1 when U_s rose", {"reward": "improvement"}),
                           ("both", {"memory": False, "reward": "improvement"})):
        regrets, seconds = [], []
        for seed in range(args.seeds):
            started = time.perf_counter()
            pricer = train_pricer("gdm", draw, args.steps, seed=seed, **options)
            seconds.append(time.perf_counter() - started)
            regrets.append(play(pricer, held_out, seed=seed + 100).regret)
        row = summary(devices[0], label, regrets, seconds)
        report["paper"].append(row)
        print(f"{label:>32}: mean regret {row['mean']:.4f} ± {row['spread']:.4f} (median {row['median']:.4f}, "
              f"p90 {row['p90']:.3f})")

    print("\n== 4. a wider prior: the worked example's public figures, each device's entry price uniform in "
          "2%..60% of kappa (what `fedfill price GAME.json` trains on) ==")
    example = PricingGame(theta=[1.0, 1.5, 0.8], capacity=[3.0, 4.5, 6.0], unit_cost=[0.358] * 3,
                          fixed_cost=[0.116] * 3, units=[12] * 3, server_cost=0.6, revenue=40.0)
    draw = GameDraw.around(example)
    rng = np.random.default_rng(17)
    held_out = [draw.draw(rng) for _ in range(args.held_out)]
    report["wide"] = []
    for label, kind, options in (("gdm", "gdm", {}), ("gdm, state: last only", "gdm", {"memory": False}),
                                 ("ppo", "ppo", {}), ("random", "random", {})):
        regrets, best_random, seconds = [], [], []
        for seed in range(args.seeds):
            started = time.perf_counter()
            pricer = train_pricer(kind, draw, args.steps if kind != "random" else 0, seed=seed, **options)
            seconds.append(time.perf_counter() - started)
            rounds = play(pricer, held_out, seed=seed + 100)
            regrets.append(rounds.regret)
            best_random.append(rounds.best_regret)
        report["wide"].append(summary(3, label, regrets, seconds))
        if kind == "random":
            report["wide"].append(summary(3, f"best of {pricer.horizon} random", best_random, [0.0]))
    report["wide"].append(best_constant_row(3, draw, held_out, rounds.optimum))
    for row in report["wide"]:
        print(f"{row['leader']:>24} | {row['mean']:7.4f} ± {row['spread']:<6.4f} {row['median']:7.4f} "
              f"{row['p90']:6.3f} | {row['train_seconds']:7.1f}")

    gdm = [r for r in rows if r["leader"] == "gdm"]
    met = all(r["mean"] <= GOAL_REGRET for r in gdm)
    report["goal"] = {"gdm_mean_regret_at_most": GOAL_REGRET, "met": met}
    print(f"\ngoal: GDM mean regret <= {GOAL_REGRET} on held-out games: "
          + ", ".join(f"{r['devices']} devices {r['mean']:.4f}" for r in gdm) + f" -> {'met' if met else 'NOT met'}")
    if args.plot:
        draw_curves(curves, report["curve_exact_mean"], devices[0], args.plot)
        print(f"learning curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def summary(devices: int, leader: str, per_seed: list[np.ndarray], seconds: list[float]) -> dict:
    means = [float(r.mean()) for r in per_seed]
    every = np.concatenate(per_seed)
    return {"devices": devices, "leader": leader, "mean": float(np.mean(means)), "spread": float(np.std(means)),
            "median": float(np.median(every)), "p90": float(np.quantile(every, 0.9)),
            "train_seconds": float(np.mean(seconds))}


def draw_curves(curves: dict, exact_mean: float, devices: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind, runs in curves.items():
        steps = np.array([s for s, _ in runs[0]])
        values = np.array([[v for _, v in run] for run in runs])
        mean, spread = values.mean(axis=0), values.std(axis=0)
        ax.plot(steps, mean, marker="o", ms=3, label=kind.upper() if kind != "random" else "random")
        ax.fill_between(steps, mean - spread, mean + spread, alpha=0.2)
    ax.axhline(exact_mean, color="k", ls="--", lw=1, label="exact optimum (knows every theta)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("leader utility (mean of 30 games)")
    ax.set_title(f"[GenMEN] pricing game, {devices} devices: mean ± sd over {len(next(iter(curves.values())))} seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
