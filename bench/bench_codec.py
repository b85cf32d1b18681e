"""Codec throughput and size on a VGG-9-sized update (3,491,530 float32 parameters), and
with --demands, which bits each planning rule picks for an error demand on real updates and
whether the codec then keeps the promise.

Why: the client encodes and the server decodes one such payload per device per round, and
the cost model charges M * bits; this shows both the speed and that the bytes agree.

    python bench/bench_codec.py [--repeat 3] [--bits 4 8 16 32]
    python bench/bench_codec.py --demands [--rounds 3]        (about a minute)

Uses VGG-9's real tensor shapes (from fedfill.models) filled with Gaussian weights; MB/s is
float32 input megabytes (4 bytes per parameter) per second. "/ Thm 1" is the measured relative
error over the [ODQ Thm. 1] bound 1/(2 L^2): above 1 the theorem does not hold for this
quantizer on these weights (the level spacing follows max |w|, not ||w||).

--demands: updates u = (weights after a few local steps) - (weights before), round after
round (the next round starts from the updated weights), of the digits VGG-9 classifier
(fedfill.models, SGD lr 0.02, batch 64: the classifier job's local training) and of the
digits UNet (generation/checkpoints/digits, AdamW lr 5e-4, batch 32: the ddpm job's
settings), on the clients' pool of the digits split; a Gaussian update with VGG-9's shapes is
the control. For each demand q ([ODQ]'s range: 6-8 bits) it prints the bits of each rule
and err/q, the exact expected relative error of the codec at those bits (codec.relative_error)
over q: above 1 the promise is broken. Rules: [ODQ Thm. 1] ("Thm 1"); the codec model
K / (L-1)^2 with the prior K = ln(2M)/3 (what the server knows in round 1); the codec model
with the K the device reported for its previous round's update (codec.codec_constant at the
bits it sent). "fewest" is the device's exact answer, codec.bits_for_demand.
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
    parser.add_argument("--demands", action="store_true",
                        help="instead: bits per planning rule and the error they deliver on real updates")
    parser.add_argument("--rounds", type=int, default=3, help="--demands: rounds of local training per model")
    args = parser.parse_args()
    if args.demands:
        return demands(args.rounds)
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
        # [ODQ Thm. 1] promises E||w - w_hat||^2 <= ||w||^2 / (2 L^2) (delta = ||w||^2).
        theorem1 = 1 / (2 * codec.num_levels(bits) ** 2) if bits < 32 else float("nan")
        print(f"{bits:>4} {megabytes / t_enc:>12.1f} {megabytes / t_dec:>12.1f} {len(payload):>12,} "
              f"{model_bytes:>12,.0f} {len(payload) / model_bytes:>17.6f} {len(payload) / (num_params * 4):>8.4f} "
              f"{rel:>9.2e} {rel / theorem1:>8.2f}")
    return 0


# ---------------------------------------------------------------- --demands

DEMANDS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def vgg9_digits_updates(rounds: int, steps: int = 4, seed: int = 0) -> list[list[np.ndarray]]:
    """Round after round of one device's SGD steps on the digits VGG-9 (the classifier job)."""
    import torch

    from fedfill.data import load_digits, split_dataset
    from fedfill.models import get_weights, model_for_images, set_weights, train

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # 2 threads on a busy 2-core host ran 30x slower
    pool = split_dataset(load_digits(), seed=seed).clients
    rng = np.random.default_rng(seed)
    model = model_for_images(pool.images.shape, pool.num_classes)
    weights, updates = get_weights(model), []
    for r in range(rounds):
        pick = rng.choice(len(pool), size=64 * steps, replace=False)
        set_weights(model, weights)
        train(model, pool.images[pick], pool.labels[pick], lr=0.02, batch_size=64, seed=seed + r)
        after = get_weights(model)
        updates.append([a - w for a, w in zip(after, weights)])
        weights = after
    return updates


def unet_digits_updates(rounds: int, steps: int = 5, seed: int = 0) -> list[list[np.ndarray]]:
    """Round after round of AdamW steps of the shipped digits UNet on the clients' digits
    (epsilon-prediction loss with 10% label dropout, as it was trained; the ddpm job's lr)."""
    import torch
    from diffusers import DDPMScheduler

    from fedfill.data import load_digits, split_dataset
    from generation.checkpoint import load_generator
    from generation.train import images_to_model_space

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # 2 threads on a busy 2-core host ran 30x slower
    config, pipe = load_generator()
    unet = pipe.unet.train()
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps)
    pool = split_dataset(load_digits(), seed=seed).clients
    x_all, y_all = images_to_model_space(pool.images), torch.as_tensor(pool.labels)
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(rounds):
        before = [p.detach().numpy().copy() for p in unet.parameters()]
        optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)  # a fresh one per round
        for _ in range(steps):
            idx = torch.randint(0, len(y_all), (32,), generator=generator)
            x0, y = x_all[idx], y_all[idx].clone()
            y[torch.rand(32, generator=generator) < 0.1] = config.null_class
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, config.train_timesteps, (32,), generator=generator)
            loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        updates.append([p.detach().numpy() - b for p, b in zip(unet.parameters(), before)])
    return updates


def gaussian_updates(rounds: int, seed: int = 0) -> list[list[np.ndarray]]:
    """The control: i.i.d. Gaussian tensors of VGG-9's shapes, each with its own scale."""
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(s) * rng.uniform(0.2, 3.0) * 1e-3).astype(np.float32) for s in VGG9_SHAPES]
            for _ in range(rounds)]


def demands(rounds: int) -> int:
    from strategies.allocation.quantization import (codec_bits_for_error, prior_codec_constant,
                                                    theorem1_bits_for_error)

    started = time.perf_counter()
    models = {"VGG-9 digits, SGD": vgg9_digits_updates, "UNet digits, AdamW": unet_digits_updates,
              "Gaussian, VGG-9 shapes": gaussian_updates}
    print("err/q: the codec's exact expected relative error at the rule's bits over the demand q "
          "(> 1: promise broken, marked !)")
    header = (f"{'round':>5} {'q':>7} | {'Thm 1':>5} {'err/q':>6} | {'prior':>5} {'err/q':>6} | "
              f"{'prev K':>6} {'err/q':>6} | {'fewest':>6}")
    rng = np.random.default_rng(1)
    broken = {"Thm 1": 0, "prior": 0, "prev K": 0}
    rows = {"Thm 1": 0, "prior": 0, "prev K": 0}
    for name, make in models.items():
        updates = make(rounds)
        m = sum(a.size for a in updates[0])
        prior = prior_codec_constant(m)
        constants = ", ".join(f"{codec.codec_constant(u, 8):.2f}" for u in updates)
        print(f"\n{name}: M = {m:,}, prior K = ln(2M)/3 = {prior:.2f}, measured K (8 bits) by round: {constants}")
        print(header)
        reported = {}  # demand -> K the device reported last round (at the bits it sent under this rule)
        for r, update in enumerate(updates, start=1):
            errors: dict[int, float] = {}

            def err(bits: int) -> float:
                if bits not in errors:
                    errors[bits] = codec.relative_error(update, bits)
                return errors[bits]

            # The expectation against one real round trip, at 8 bits.
            decoded = codec.decode(codec.encode(update, 8, rng))
            drawn = sum(float(np.sum((a.astype(np.float64) - d) ** 2)) for a, d in zip(update, decoded)) / \
                sum(float(np.sum(a.astype(np.float64) ** 2)) for a in update)
            for q in DEMANDS:
                picks = {"Thm 1": int(theorem1_bits_for_error(q)), "prior": int(codec_bits_for_error(q, prior)),
                         "prev K": int(codec_bits_for_error(q, reported.get(q, prior)))}
                cells = []
                for rule, bits in picks.items():
                    ratio = err(bits) / q
                    rows[rule] += 1
                    broken[rule] += ratio > 1
                    cells.append(f"{bits:>5} {ratio:>5.2f}{'!' if ratio > 1 else ' '}")
                fewest = codec.bits_for_demand(update, q)
                print(f"{r:>5} {q:>7.0e} | " + " | ".join(cells) + f" | {fewest:>6}")
                reported[q] = codec.codec_constant(update, picks["prev K"])
            print(f"{'':>5} one real encode/decode at 8 bits: relative error {drawn:.3e}, exact expectation "
                  f"{err(8):.3e}")
    print("\npromises broken: " + ", ".join(f"{rule} {broken[rule]}/{rows[rule]}" for rule in rows)
          + f"   ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
