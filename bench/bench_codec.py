"""Codec throughput and size on a VGG-9-sized update (3,491,530 float32 parameters).

Why: the client encodes and the server decodes one such payload per device per round, and
the cost model charges M * bits; this shows both the speed and that the bytes agree.

    python bench/bench_codec.py [--repeat 3] [--bits 4 8 16 32]

Uses VGG-9's real tensor shapes (from fedfill.models) filled with Gaussian weights; MB/s is
float32 input megabytes (4 bytes per parameter) per second. "/ Thm 1" is the measured relative
error over seed 000's Theorem 1 bound 1/(2 L^2): above 1 the theorem does not hold for this
quantizer on these weights (the level spacing follows max |w|, not ||w||).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfill import codec  # noqa: E402

# VGG-9 (FedMA ModerateCNN) tensor shapes for 3x32x32 inputs and 10 classes, listed here so
# the benchmark needs no torch; tests/test_models.py checks the model has these counts.
VGG9_SHAPES = [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,),
               (128, 128, 3, 3), (128,), (256, 128, 3, 3), (256,), (256, 256, 3, 3), (256,),
               (512, 4096), (512,), (512, 512), (512,), (10, 512), (10,)]


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in VGG9_SHAPES]
    num_params = sum(a.size for a in arrays)
    megabytes = num_params * 4 / 1e6
    print(f"{num_params:,} parameters ({megabytes:.2f} MB float32), {len(arrays)} tensors, best of {args.repeat}")
    print(f"{'bits':>4} {'encode MB/s':>12} {'decode MB/s':>12} {'bytes':>12} {'M*bits/8':>12} "
          f"{'bytes/(M*bits/8)':>17} {'vs fp32':>8} {'rel. MSE':>9} {'/ Thm 1':>8}")
    for bits in args.bits:
        payload = codec.encode(arrays, bits, rng)
        t_enc = best_seconds(lambda: codec.encode(arrays, bits, rng), args.repeat)
        t_dec = best_seconds(lambda: codec.decode(payload), args.repeat)
        decoded = codec.decode(payload)
        assert len(payload) == codec.payload_bytes([a.size for a in arrays], bits)
        model_bytes = num_params * bits / 8
        err = sum(float(np.sum((a - d) ** 2)) for a, d in zip(arrays, decoded))
        rel = err / sum(float(np.sum(a ** 2)) for a in arrays)
        # Theorem 1 of seed 000 promises E||w - w_hat||^2 <= ||w||^2 / (2 L^2) (delta = ||w||^2).
        theorem1 = 1 / (2 * codec.num_levels(bits) ** 2) if bits < 32 else float("nan")
        print(f"{bits:>4} {megabytes / t_enc:>12.1f} {megabytes / t_dec:>12.1f} {len(payload):>12,} "
              f"{model_bytes:>12,.0f} {len(payload) / model_bytes:>17.6f} {len(payload) / (num_params * 4):>8.4f} "
              f"{rel:>9.2e} {rel / theorem1:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
