"""Split generation [MEG] measured: bytes, quality and work per delivery mode.

    python bench/bench_delivery.py [--per-class 30] [--steps 20] [--json FILE]

On the shipped digits checkpoint (8x8x1, DDIM, guidance 2):

1. Bytes: what each mode's reply takes on the wire (through a real gRPC service, 100 images)
   against the exact payload formula (design note III.1.6), with the ratio; beside it, the
   paper's own latent-diffusion figures, which pixel-space digits do not share.
2. Quality: class fidelity (the reference classifier trained on the clients' real images) and
   the Frechet distance in its feature space to the real test images, per mode, per hand-off
   step k of S, per state width q and per channel SNR, with the noise-aware resume (F-2) and
   without it (naive). Image mode is the baseline of the same run.
3. Work: the server's and the device's UNet passes and seconds per mode.

The goals it checks (issue "Split generation"): state at 4 bits handed over half way keeps
fidelity >= 0.9 for <= 0.6x image mode's downlink and about half its server UNet passes;
sketch at factor 2 keeps fidelity >= 0.85; seed costs under 5% of image mode's downlink.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfill.codec import decode, encode, expected_squared_error, payload_bytes  # noqa: E402
from fedfill.data import load_digits, split_dataset  # noqa: E402
from generation.checkpoint import load_generator  # noqa: E402
from generation.client import GenerationClient  # noqa: E402
from generation.config import DEFAULT_CHECKPOINT  # noqa: E402
from generation.delivery import finish  # noqa: E402
from generation.quality import ReferenceClassifier, frechet_distance  # noqa: E402
from generation.sample import complete, complete_sketch, downsample, sample, sample_until  # noqa: E402
from generation.service import serve  # noqa: E402

# [MEG]'s Fig. 6 case: Stable-Diffusion-style image-to-image generation
MEG_IMAGE_BITS, MEG_LATENT_BITS = 1.37e6, 28e3


def exact_payload(mode: str, n: int, pixels: int, *, bits: int = 8, factor: int = 2, batch: int = 256) -> int:
    """The design note's formula: the bytes a mode's content takes (no labels, no framing)."""
    if mode == "image":
        return n * pixels
    if mode == "sketch":
        return n * pixels // factor ** 2
    if mode == "state":
        return sum(payload_bytes([min(batch, n - start) * pixels], bits) for start in range(0, n, batch))
    return 0


def bytes_table(config, steps: int, n_per_class: int = 10) -> list[dict]:
    rows = []
    counts = [n_per_class] * config.num_classes
    n, pixels = sum(counts), config.image_size ** 2 * config.channels
    cases = [("image", {}), ("sketch", {"sketch_factor": 2}), ("sketch", {"sketch_factor": 4}), ("seed", {})]
    cases += [("state", {"state_bits": q}) for q in (2, 4, 8, 32)]
    with tempfile.TemporaryDirectory() as cache:
        server, port, _ = serve(DEFAULT_CHECKPOINT, 0, cache)
        try:
            client = GenerationClient(f"127.0.0.1:{port}", timeout_s=600, retries=0)
            for mode, options in cases:
                delivered = client.fetch(counts, 0, steps, 2.0, delivery=mode, server_steps=steps // 2, **options)
                exact = exact_payload(mode, n, pixels, bits=options.get("state_bits", 8),
                                      factor=options.get("sketch_factor", 2))
                rows.append({"mode": mode, **options, "images": n, "wire_bytes": delivered.downlink_bytes,
                             "payload_bytes": exact,
                             "ratio": delivered.downlink_bytes / exact if exact else None})
        finally:
            server.stop(grace=1)
    image_bytes = rows[0]["wire_bytes"]
    for row in rows:
        row["x_image"] = row["wire_bytes"] / image_bytes
    return rows


def _three(figures: dict) -> str:
    return f"{figures['fidelity']:.3f} / {figures['frechet']:5.2f} / {figures.get('drift', 0.0):5.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30, help="images per class in the quality runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    started_all = time.perf_counter()
    split = split_dataset(load_digits(), seed=0)
    judge = ReferenceClassifier(split.clients.images, split.clients.labels)
    real_features = judge.features(split.test.images)
    config, pipe = load_generator(DEFAULT_CHECKPOINT)
    S = args.steps
    labels = np.repeat(np.arange(config.num_classes), args.per_class)
    n = len(labels)
    report: dict = {"steps": S, "images": n}

    reference = None  # image mode's images, once drawn

    def score(images) -> dict:
        """Class fidelity, Frechet distance, and how far the images drifted from what image
        mode draws (mean absolute pixel difference, 0-255): a hand-off can keep the class and
        still lose the content it was sent."""
        figures = {"fidelity": float(np.mean(judge.predict(images) == labels)),
                   "frechet": frechet_distance(judge.features(images), real_features)}
        if reference is not None:
            figures["drift"] = float(np.abs(images.astype(np.int16) - reference).mean())
        return figures

    print(f"== 1. bytes per mode (real gRPC service, {10 * config.num_classes} images of 8x8x1, hand-off at "
          f"{S // 2} of {S}) ==")
    report["bytes"] = bytes_table(config, S)
    print(f"{'mode':>7} {'option':>8} | {'wire B':>7} {'payload B':>9} {'ratio':>6} | {'x image':>7}")
    for row in report["bytes"]:
        option = f"q={row['state_bits']}" if "state_bits" in row else (
            f"r={row['sketch_factor']}" if "sketch_factor" in row else "")
        ratio = f"{row['ratio']:6.3f}" if row["ratio"] else "     -"
        print(f"{row['mode']:>7} {option:>8} | {row['wire_bytes']:7d} {row['payload_bytes']:9d} {ratio} | "
              f"{row['x_image']:7.3f}")
    print(f"[MEG] Fig. 6 (latent diffusion): {MEG_IMAGE_BITS / 8e3:.0f} kB per image, {MEG_LATENT_BITS / 8e3:.1f} kB "
          f"per latent seed: x{MEG_LATENT_BITS / MEG_IMAGE_BITS:.3f}. In pixel space a state has the image's "
          f"element count: at 8 bits it saves nothing, below 8 bits at most q/8.")

    print(f"\n== 2. quality ({n} images, {args.per_class} per class; fidelity by a classifier of real digits, "
          f"Frechet distance to the real test set) ==")
    started = time.perf_counter()
    reference = sample(config, pipe, labels, steps=S, seed=args.seed)
    image_seconds = time.perf_counter() - started
    baseline = score(reference)
    quality = [{"mode": "image", **baseline}]
    print(f"image mode: fidelity {baseline['fidelity']:.3f}, Frechet {baseline['frechet']:.2f} "
          f"({image_seconds:.1f} s on the server)")
    handoffs = [k for k in (S // 4, S // 2, 3 * S // 4) if 1 <= k <= S - 1]
    print(f"\nstate, per hand-off step k of {S} and width q: fidelity / Frechet / drift from image mode's "
          f"images, noise-aware (F-2) | naive")
    print(f"{'k':>3} {'q':>3} {'noise var':>10} | {'F-2':>22} | {'naive':>22}")
    states_at = {}
    for k in handoffs:
        states_at[k] = sample_until(config, pipe, labels, steps=S, seed=args.seed, stop_index=k)
        for q in (2, 3, 4, 6, 8, 32):
            received = decode(encode([states_at[k]], q, np.random.default_rng([args.seed, k, q])))[0]
            noise_var = expected_squared_error([states_at[k]], q) / states_at[k].size
            row = {"mode": "state", "k": k, "q": q, "noise_var": noise_var}
            for how in ("aware", "naive"):
                images = complete(config, pipe, received, labels, steps=S, resume_index=k, noise_var=noise_var,
                                  naive=how == "naive")
                row[how] = score(images)
                if q == 32:
                    row[how]["equal_to_image"] = bool(np.array_equal(images, reference))
            quality.append(row)
            print(f"{k:3d} {q:3d} {noise_var:10.2e} | {_three(row['aware'])} | {_three(row['naive'])}")

    k = S // 2
    print(f"\nstate at 32 bits handed over at k={k}, white Gaussian channel noise per SNR")
    print(f"{'SNR dB':>7} {'noise var':>10} | {'F-2':>22} | {'naive':>22}")
    power = float(np.mean(np.square(states_at[k], dtype=np.float64)))
    for snr in (None, 20, 10, 0, -10, -20):
        noise_var = 0.0 if snr is None else power * 10 ** (-snr / 10)
        rng = np.random.default_rng([args.seed, 7, 0 if snr is None else snr + 100])
        received = (states_at[k] + rng.normal(0, math.sqrt(noise_var), states_at[k].shape)).astype(np.float32)
        row = {"mode": "state-channel", "k": k, "q": 32, "snr_db": snr, "noise_var": noise_var}
        for how in ("aware", "naive"):
            row[how] = score(complete(config, pipe, received, labels, steps=S, resume_index=k, noise_var=noise_var,
                                      naive=how == "naive"))
        quality.append(row)
        print(f"{'none' if snr is None else snr:>7} {noise_var:10.2e} | {_three(row['aware'])} | {_three(row['naive'])}")

    print(f"\nsketch: the image downsampled r times per side, re-noised to step k of {S} and completed")
    print(f"{'r':>3} {'k':>3} | {'fidelity / Frechet / drift':>26}")
    for factor in (2, 4):
        sketches = downsample(reference, factor)
        for k in handoffs:
            row = {"mode": "sketch", "r": factor, "k": k,
                   **score(complete_sketch(config, pipe, sketches, labels, steps=S, seed=args.seed, resume_index=k))}
            quality.append(row)
            print(f"{factor:3d} {k:3d} | {_three(row):>26}")
    report["quality"] = quality

    print(f"\n== 3. work per mode (real gRPC service, {n} images, hand-off at {S // 2}, state at 4 bits) ==")
    work = []
    counts = [args.per_class] * config.num_classes
    for mode, options in (("image", {}), ("state", {"state_bits": 4}), ("sketch", {"sketch_factor": 2}), ("seed", {})):
        with tempfile.TemporaryDirectory() as cache:  # a service of its own: nothing served from another's cache
            server, port, _ = serve(DEFAULT_CHECKPOINT, 0, cache)
            try:
                client = GenerationClient(f"127.0.0.1:{port}", timeout_s=3600, retries=0)
                delivered = client.fetch(counts, args.seed, S, 2.0, delivery=mode, server_steps=S // 2, **options)
                finished = finish(delivered, config, pipe, steps=S, guidance=2.0, seed=args.seed)
            finally:
                server.stop(grace=1)
        work.append({"mode": mode, "downlink_bytes": delivered.downlink_bytes,
                     "server_unet_evals": delivered.server_unet_evals, "server_seconds": delivered.server_seconds,
                     "device_unet_evals": finished.device_unet_evals, "device_seconds": finished.device_seconds,
                     "fidelity": score(finished.images)["fidelity"]})
    print(f"{'mode':>7} | {'downlink B':>10} {'x image':>7} | {'server passes':>13} {'s':>6} | "
          f"{'device passes':>13} {'s':>6} | {'fidelity':>8}")
    for row in work:
        print(f"{row['mode']:>7} | {row['downlink_bytes']:10d} {row['downlink_bytes'] / work[0]['downlink_bytes']:7.3f} | "
              f"{row['server_unet_evals']:13d} {row['server_seconds']:6.2f} | {row['device_unet_evals']:13d} "
              f"{row['device_seconds']:6.2f} | {row['fidelity']:8.3f}")
    report["work"] = work

    state4 = next(r for r in quality if r["mode"] == "state" and r["k"] == S // 2 and r["q"] == 4)
    state_work = next(r for r in work if r["mode"] == "state")
    sketch2 = next(r for r in quality if r["mode"] == "sketch" and r["r"] == 2 and r["k"] == S // 2)
    seed_work = next(r for r in work if r["mode"] == "seed")
    goals = {
        "state q=4 k=S/2 fidelity >= 0.9": state4["aware"]["fidelity"] >= 0.9,
        "state q=4 downlink <= 0.6x image": state_work["downlink_bytes"] <= 0.6 * work[0]["downlink_bytes"],
        "state k=S/2 server passes ~ half of image's": abs(state_work["server_unet_evals"]
                                                           / work[0]["server_unet_evals"] - 0.5) < 0.01,
        "sketch r=2 k=S/2 fidelity >= 0.85": sketch2["fidelity"] >= 0.85,
        "seed downlink < 5% of image": seed_work["downlink_bytes"] < 0.05 * work[0]["downlink_bytes"],
    }
    report["goals"] = goals
    print("\n== goals ==")
    for goal, met in goals.items():
        print(f"{'met' if met else 'NOT MET':>8}  {goal}")
    report["seconds"] = time.perf_counter() - started_all
    print(f"\n({report['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
