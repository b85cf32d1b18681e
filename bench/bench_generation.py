"""Generation benchmark: sampler speed, cache, training throughput.

    python bench/bench_generation.py          # about a minute on 2 cores

On the shipped digits checkpoint: images per second with DDIM at 20 and 50 steps (and
DPM-Solver++ at 20) against 1000-step ancestral DDPM sampling, each with the reference
classifier's class fidelity so speed is never bought with quality; a cache hit against a
miss through the real gRPC service; training steps per second. Ratios against the
baselines measured in the same run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfill.data import load_digits, split_dataset  # noqa: E402
from generation.client import GenerationClient  # noqa: E402
from generation.checkpoint import load_generator
from generation.config import DEFAULT_CHECKPOINT  # noqa: E402
from generation.quality import ReferenceClassifier  # noqa: E402
from generation.sample import sample  # noqa: E402
from generation.service import serve  # noqa: E402
from generation.train import train_generator  # noqa: E402


def main() -> int:
    split = split_dataset(load_digits(), seed=0)
    judge = ReferenceClassifier(split.clients.images, split.clients.labels)
    config, pipe = load_generator(DEFAULT_CHECKPOINT)

    print("== sampling (shipped digits checkpoint, guidance 2) ==")
    print(f"{'sampler':>8} {'steps':>5} {'images':>6} | {'seconds':>8} {'img/s':>8} {'x DDPM':>7} | {'fidelity':>8}")
    baseline = None
    for sampler, steps, n_per_class in (("ddpm", 1000, 5), ("ddim", 50, 20), ("ddim", 20, 20), ("dpm", 20, 20)):
        labels = np.repeat(np.arange(10), n_per_class)
        started = time.perf_counter()
        images = sample(config, pipe, labels, steps=steps, guidance=2.0, seed=0, sampler=sampler)
        seconds = time.perf_counter() - started
        rate = len(labels) / seconds
        baseline = baseline or rate
        fidelity = float(np.mean(judge.predict(images) == labels))
        print(f"{sampler:>8} {steps:5d} {len(labels):6d} | {seconds:8.2f} {rate:8.1f} {rate / baseline:7.1f} | {fidelity:8.2%}")

    print("\n== cache (real gRPC service, 200 images, DDIM 20 steps) ==")
    with tempfile.TemporaryDirectory() as cache:
        server, port, _ = serve(DEFAULT_CHECKPOINT, 0, cache)
        client = GenerationClient(f"127.0.0.1:{port}")
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            client.generate([20] * 10, seed=42, steps=20)
            timings.append(time.perf_counter() - started)
        server.stop(grace=1)
    print(f"miss {timings[0]:.3f} s, hit {timings[1]:.4f} s: {timings[0] / timings[1]:.0f}x")

    print("\n== training (digits public split, batch 64) ==")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train_generator(split.public.images, split.public.labels, split.public.class_names, out, steps=60,
                        batch_size=64, save_every=1000, progress=False)
        seconds = time.perf_counter() - started
    print(f"60 steps in {seconds:.1f} s: {60 / seconds:.1f} steps/s (the shipped 3000 steps: ~{3000 / (60 / seconds) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
