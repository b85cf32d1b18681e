"""`fedfill fit-learning`: measure the FIMI learning model's points and fit alpha, beta, gamma.

[FIMI eq. 1] models a device's local error as delta(D) = alpha D^-beta - gamma and
fits it on a public proxy task without printing numbers, so we measure our own: train the
job's model on growing nested subsets of the server's public split, take 1 - accuracy on a
held-out stratified part of that same public split (never the clients' pool or the test
set), average over seeds, fit, and write the fit where the user says. The fits we ship were
made with `-o strategies/allocation/learning_fits/<dataset>.json` from a source tree.

Each run gets at least `--steps` SGD updates whatever its size, so a 25-sample run is trained
to convergence too and the curve measures data, not optimisation budget.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfill.errors import UsageError

DEFAULT_SIZES = ("25", "50", "100", "150", "200", "all")


@dataclass(frozen=True)
class CurveSettings:
    sizes: tuple[int, ...]
    seeds: int = 5
    steps: int = 600
    lr: float = 0.02
    batch_size: int = 32
    width: float | None = None  # None: the job's default for this image size


@dataclass(frozen=True)
class CurvePoints:
    sizes: np.ndarray  # [S]
    errors: np.ndarray  # [S, seeds]: 1 - held-out accuracy per run

    @property
    def mean_errors(self) -> np.ndarray:
        return self.errors.mean(axis=1)


def measure_curve(train_images: np.ndarray, train_labels: np.ndarray, held_images: np.ndarray,
                  held_labels: np.ndarray, num_classes: int, settings: CurveSettings,
                  progress=None) -> CurvePoints:
    """Train a fresh model per (size, seed) on the first `size` samples of a seeded permutation.

    Subsets are nested (each size extends the smaller one of the same seed), which removes
    the between-size noise of unrelated draws.
    """
    import torch

    from fedfill.models import accuracy, model_for_images, train

    errors = np.zeros((len(settings.sizes), settings.seeds))
    for seed in range(settings.seeds):
        order = np.random.default_rng(seed).permutation(len(train_labels))
        for i, size in enumerate(settings.sizes):
            torch.manual_seed(seed)
            model = model_for_images(train_images.shape, num_classes, settings.width)
            subset = order[:size]
            train(model, train_images[subset], train_labels[subset], lr=settings.lr, batch_size=settings.batch_size,
                  min_steps=settings.steps, seed=seed)
            errors[i, seed] = 1.0 - accuracy(model, held_images, held_labels)
            if progress:
                progress(size, seed, errors[i, seed])
    return CurvePoints(np.asarray(settings.sizes, dtype=float), errors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help="dataset name (see fedfill.data.load_dataset: digits, mnist5k, or one "
                        "from --data-root); default digits")
    parser.add_argument("--data-root", help="directory of a real dataset in its published format")
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), metavar="N",
                        help="training-set sizes; 'all' is the whole public training part (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="runs per size, averaged (default 5)")
    parser.add_argument("--steps", type=int, default=600, help="minimum SGD steps per run (default 600)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (FIMI: 0.02)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=float, help="VGG-9 width multiplier (default: the job's: 1/4 for 8x8 images, 1/2 for 28x28, else 1)")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="stratified fraction of the public split held out to measure the error (default 0.3)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of split_dataset (must match the job's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest for the tiny digits model on a shared CPU (default 1)")
    parser.add_argument("--output", "-o", help="fit JSON to write (default: <dataset>-learning-fit.json here)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the points and the fitted curve")


def _parse_sizes(tokens: list[str], available: int) -> tuple[int, ...]:
    sizes = set()
    for token in tokens:
        if token == "all":
            sizes.add(available)
            continue
        try:
            size = int(token)
        except ValueError:
            raise UsageError(f"--sizes takes integers or 'all', got {token!r}") from None
        if not 1 <= size <= available:
            raise UsageError(f"--sizes {size}: the public training part has {available} samples")
        sizes.add(size)
    if len(sizes) < 4:
        raise UsageError(f"need at least 4 distinct sizes to fit alpha, beta, gamma, got {sorted(sizes)}")
    return tuple(sorted(sizes))


def run(args: argparse.Namespace) -> int:
    import torch

    from fedfill.data import load_dataset, split_dataset, stratified_split
    from strategies.allocation.learning import fit_learning_model

    for name, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--threads", args.threads, 1)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if not 0 < args.holdout < 1:
        raise UsageError(f"--holdout must be in (0, 1), got {args.holdout}")
    if not args.lr > 0 or (args.width is not None and not args.width > 0):
        raise UsageError("--lr and --width must be positive")
    try:
        dataset = load_dataset(args.dataset, args.data_root)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    torch.set_num_threads(args.threads)

    public = split_dataset(dataset, seed=args.split_seed).public
    held, pool = stratified_split(public, [args.holdout], seed=args.split_seed)
    settings = CurveSettings(_parse_sizes(args.sizes, len(pool)), args.seeds, args.steps, args.lr,
                             args.batch_size, args.width)
    print(f"{args.dataset}: public split {len(public)} samples -> {len(pool)} to train on, {len(held)} held out; "
          f"sizes {list(settings.sizes)}, {settings.seeds} seeds, >= {settings.steps} SGD steps "
          f"(lr {settings.lr}, batch {settings.batch_size})", flush=True)
    start = time.perf_counter()
    points = measure_curve(pool.images, pool.labels, held.images, held.labels, dataset.num_classes, settings,
                           progress=lambda size, seed, err: print(f"  D={size:<5} seed {seed}: error {err:.4f}",
                                                                  flush=True))
    seconds = time.perf_counter() - start

    from fedfill.models import count_parameters, model_for_images

    model = model_for_images(pool.images.shape, dataset.num_classes, settings.width)
    source = (f"fedfill fit-learning: {args.dataset} public split (split seed {args.split_seed}), "
              f"{args.holdout:g} held out stratified; VGG-9 {count_parameters(model)} params; "
              f">= {settings.steps} SGD steps lr {settings.lr} batch {settings.batch_size}; "
              f"mean of {settings.seeds} seeds per size")
    try:
        fit = fit_learning_model(points.sizes, points.mean_errors, source=source)
    except (ValueError, RuntimeError) as err:  # curve_fit raises RuntimeError when it cannot converge
        raise UsageError(f"the measured points could not be fitted: {err}") from None

    output = Path(args.output) if args.output else Path(f"{args.dataset.lower()}-learning-fit.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    fit.save(output)
    print_fit(fit, points, seconds, output)
    if args.plot:
        plot_fit(fit, points, args.plot)
        print(f"plot: {args.plot}")
    return 0


def print_fit(fit, points: CurvePoints, seconds: float, output: Path) -> None:
    print(f"\ndelta(D) = {fit.alpha:.6g} * D^-{fit.beta:.6g} - {fit.gamma:.6g}")
    print(f"{'D':>6} {'error (mean)':>13} {'std':>7} {'fit':>8} {'residual':>9}")
    for d, e, sd, r in zip(points.sizes, points.mean_errors, points.errors.std(axis=1), fit.residuals):
        print(f"{int(d):>6} {e:>13.4f} {sd:>7.4f} {float(fit.error(d)):>8.4f} {r:>+9.4f}")
    rms = float(np.sqrt(np.mean(np.square(fit.residuals))))
    print(f"RMS residual {rms:.4f}; {points.errors.size} training runs in {seconds:.1f} s; saved {output}")
    if fit.beta < 1e-3 or points.mean_errors[-1] >= points.mean_errors[0]:
        print("warning: the error does not fall with D, so the power law is degenerate; "
              "train longer (--steps) or average more runs (--seeds)")
    with np.errstate(over="ignore", divide="ignore"):
        zero_at = float(fit.samples_for_error(0.0)) if fit.gamma > 0 and fit.beta > 0 else math.inf
    if math.isfinite(zero_at):
        # Past this size the power law predicts a negative error: plans there are extrapolation.
        print(f"note: the fit reaches zero error at D = {zero_at:.0f}; measured up to D = {int(points.sizes.max())}")


def plot_fit(fit, points: CurvePoints, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for seed in range(points.errors.shape[1]):
        ax.scatter(points.sizes, points.errors[:, seed], s=10, color="0.6", label="runs" if seed == 0 else None)
    ax.scatter(points.sizes, points.mean_errors, color="C0", zorder=3, label="mean")
    grid = np.geomspace(points.sizes.min(), points.sizes.max(), 100)
    ax.plot(grid, fit.error(grid), color="C1",
            label=f"{fit.alpha:.3g} D^-{fit.beta:.3g} - {fit.gamma:.3g}")
    ax.set_xscale("log")
    ax.set_xticks(points.sizes, [str(int(d)) for d in points.sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training samples D")
    ax.set_ylabel("held-out error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
