"""The ddpm job on a device: local fine-tuning speed, bytes per update, energy at equal quality.

    python bench/bench_diffusion.py                      # speed and bytes (about a minute on 2 busy cores)
    python bench/bench_diffusion.py --sections speed --steps 8 --repeat 5 --batches 32 64 128
    python bench/bench_diffusion.py --sections energy --compare DIR [--frechet-target X]
    python bench/bench_diffusion.py --sections speed,trainer --steps 200 --batches 32 128   # on a GPU

Every figure comes from the job's own code: `DiffusionJob.train` (jobs.ddpm) with the
ddpm job's defaults (RunConfig job "ddpm" and JOB_DEFAULTS: AdamW at 5e-4, batch 32, 5 local
epochs) on the real local data of one node of the default fleet (`job.node_data`: 10 devices,
Dir(0.3) over the digits clients' pool; the node holding the most images, so that a larger
batch still fits), starting from the shipped digits-0to4 generator.

1. speed: what a round's local step costs a device, full UNet (1.0M weights trained) against
   LoRA rank 4 (82,560 adapter weights trained, the base frozen). Whole `train` calls of a
   fixed number of local steps (a step is one batch: local_epochs x floor(images / batch),
   the epochs chosen to give --steps), best of --repeat after one warm-up call, on the CPU
   with 1 thread (what a simulated device gets) and on the GPU when torch sees one. A whole
   call includes building the device's model (a copy of the start, the adapters injected,
   the optimizer): "in loop" is the share of the call spent in the step loop
   (LocalResult.seconds). "x full" is LoRA's steps/s over full's, same device and batch, in
   this run. Expect no gain: LoRA's backward skips the base's weight gradients but still
   runs through every layer, the adapters add their own work, and injecting them (peft)
   adds to every call. On the busy 2-core host this ratio moved between 0.65 and 1.1 from
   run to run: more --steps and --repeat give a steadier figure.
   On a GPU every setting runs twice: "eager", and "graph", the step replayed as one CUDA
   graph (generation.step); "x eager" is graph's steps/s over eager's. On a GPU a step of this
   small UNet costs kernel launches and Python, not arithmetic, which is what the graph saves.

2. bytes: what the cost model charges (M x bits / 8, M the weights a device uploads) against
   what fedfill's codec really sends for a real update (weights after one real local `train`
   minus the start, seed 0; --local-epochs shortens it), for the full model and LoRA ranks 1,
   4, 8. bytes / (M*bits/8) is the headers' share: a 16-byte payload header and 36 bytes per
   tensor, little for 1.0M weights in 209 tensors (1.5% at 4 bits, under 1% from 6 bits), a
   real surcharge for LoRA's 134 small tensors at low bits (rank 1 at 4 bits: about half as
   much again). "/ full" is the payload over the full model's at the same bits.
   "rel. error" is the codec's exact expected relative error E||u - u_hat||^2 / ||u||^2 of
   that update (codec.relative_error). For the full model u is the change of the UNet's
   weights, so this is the error the model gets. For LoRA u is the change of the adapter
   tensors A and B, not of the weights the model computes with: those change by
   B A - B0 A0 in every adapted layer (B0 = 0 at the start, alpha = rank: scale 1), and
   "err on BA" is the relative error of that change after one real encode/decode (a single
   draw; 0 at 32 bits): what the quantization does to the model under LoRA.

3. energy: the point of [ODQ]'s on-demand quantization, from a `fedfill compare --job ddpm` run that
   includes fixed-8 and ondemand: per policy, the cumulative device energy ([ODQ]'s cost
   model) and uplink bytes at the first round whose Fréchet distance (lower is better)
   falls to the target, and the ratio to fixed-8. The default target is the worst final
   Fréchet distance of the policies compared, so that every one reaches it; --frechet-target
   sets another (a policy that never reaches it shows N/A). Round 0 (the start, no cost) is
   not counted.

4. trainer: the generator's trainer (`fedfill generator train`'s train_generator) on the
   public split, steps/s per device, batch and, on a GPU, eager against CUDA graph. The rate
   is the difference of two runs of --trainer-steps lengths, so that building the model, a
   graph's warm-up and capture and the final save cancel (after one uncounted run per
   device: a process's first run pays more). Batch 64 is the shipped checkpoints' recipe;
   the larger batches show what a GPU does with more images a step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfill import codec  # noqa: E402
from fedfill.config import JOB_DEFAULTS, RunConfig  # noqa: E402
from server.report import read_rounds  # noqa: E402

SECTIONS = ("speed", "bytes", "energy", "trainer")
BITS = (4, 6, 7, 8, 32)
LORA_RANKS = (1, 4, 8)
SPEED_LORA_RANK = 4
COMPARE_HINT = ("fedfill compare --job ddpm --policies fp32,fixed-8,fixed-6,ondemand --out runs/compare-ddpm")


def ddpm_run(**changes) -> RunConfig:
    """The ddpm job's run config as `fedfill run --job ddpm` makes it with no flags given."""
    return replace(RunConfig(job="ddpm", **JOB_DEFAULTS["ddpm"]), **changes)


def busiest_node(run: RunConfig):
    """(partition id, its local data): the node of the fleet holding the most images."""
    from jobs import load_job

    job = load_job(run)
    sizes = [len(job.node_data(i, run.num_partitions)) for i in range(run.num_partitions)]
    node = int(np.argmax(sizes))
    return node, job.node_data(node, run.num_partitions)


def graph_settings(device: str) -> tuple[bool, ...]:
    """Whether a step replays as a CUDA graph: on a GPU eager first (the baseline), then graph."""
    return (False, True) if device == "cuda" else (False,)


@contextlib.contextmanager
def placed_on(device: str):
    """The job's and the trainer's models and batches on `device` (both take the GPU whenever
    there is one)."""
    from generation import train
    from jobs import ddpm as finetune

    saved = finetune.pick_device, train.pick_device
    finetune.pick_device = train.pick_device = lambda: device
    try:
        yield
    finally:
        finetune.pick_device, train.pick_device = saved


def quiet_diffusers() -> None:
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the job's .to(float32) warns on every model it builds


# ---------------------------------------------------------------- 1. speed

def speed(args) -> None:
    import torch

    from jobs import load_job

    run = ddpm_run()
    node, data = busiest_node(run)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"== 1. local fine-tuning speed: node {node} ({len(data)} images), {args.steps} steps a call "
          f"(or the next whole epoch), best of {args.repeat} after a warm-up, CPU with 1 thread ==")
    print(f"{'device':>6} {'step':>5} {'batch':>5} {'trainable':>9} {'weights':>9} {'steps':>5} | {'call s':>7} "
          f"{'in loop':>7} | {'steps/s':>8} {'images/s':>8} {'x full':>6} {'x eager':>7}")
    for device in devices:
        for batch in args.batches:
            batch = min(batch, len(data))  # what train does with a batch larger than the node's data
            per_epoch = len(data) // batch
            epochs = max(1, math.ceil(args.steps / per_epoch))
            steps = epochs * per_epoch
            eager_rates = {}
            for graphs in graph_settings(device):
                baseline = None
                for trainable in ("full", "lora"):
                    job = load_job(ddpm_run(trainable=trainable, lora_rank=SPEED_LORA_RANK, batch_size=batch,
                                            local_epochs=epochs, eager_gpu_steps=not graphs))
                    with placed_on(device):
                        start = job.initial_weights()
                        calls = [timed_train(job, start, data) for _ in range(1 + args.repeat)][1:]  # warm-up
                    seconds, in_loop = min(calls)
                    rate = steps / seconds
                    baseline = baseline or rate
                    eager = eager_rates.setdefault(trainable, rate)
                    name = trainable if trainable == "full" else f"lora r{SPEED_LORA_RANK}"
                    print(f"{device:>6} {'graph' if graphs else 'eager':>5} {batch:5d} {name:>9} "
                          f"{sum(w.size for w in start):9,} {steps:5d} | {seconds:7.3f} {in_loop / seconds:7.0%} | "
                          f"{rate:8.2f} {rate * batch:8.1f} {rate / baseline:6.2f} {rate / eager:7.2f}")
    if not torch.cuda.is_available():
        print("(no GPU: torch.cuda.is_available() is False)")


def timed_train(job, start, data) -> tuple[float, float]:
    """(seconds of one whole `train` call, seconds of its step loop)."""
    started = time.perf_counter()
    result = job.train(start, data.images, data.labels, seed=0, threads=1)
    return time.perf_counter() - started, result.seconds


def trainer(args) -> None:
    """The generator's trainer (generation.train.train_generator) on the public split, per
    device, step kind and batch: steps/s from two runs of different lengths, (n2 - n1) /
    (t2 - t1), so that building the model, a graph's warm-up and capture and the saves cancel."""
    import tempfile

    import torch

    from fedfill.data import load_digits, split_dataset
    from generation.train import train_generator

    public = split_dataset(load_digits(), seed=0).public
    short, long = args.trainer_steps
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\n== 4. the generator's trainer: {len(public)} public images, steps/s between runs of {short} and "
          f"{long} steps, all cores ==")
    print(f"{'device':>6} {'step':>5} {'batch':>5} | {'s short':>8} {'s long':>8} | {'steps/s':>8} {'images/s':>9} "
          f"{'x eager':>7}")
    def seconds_of(device: str, steps: int, batch: int, graphs: bool) -> float:
        with tempfile.TemporaryDirectory() as out, placed_on(device):
            started = time.perf_counter()
            train_generator(public.images, public.labels, public.class_names, out, steps=steps, batch_size=batch,
                            save_every=10 ** 9, progress=False, cuda_graphs=graphs)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

    for device in devices:
        seconds_of(device, short, min(args.trainer_batches), False)  # warm-up: the process's first run pays more
        for batch in args.trainer_batches:
            if device == "cpu" and batch > max(args.batches):
                continue  # large batches are the GPU's lever; on 2 CPU cores they only take minutes
            eager = None
            for graphs in graph_settings(device):
                seconds = [seconds_of(device, steps, batch, graphs) for steps in (short, long)]
                row = f"{device:>6} {'graph' if graphs else 'eager':>5} {batch:5d} | {seconds[0]:8.3f} {seconds[1]:8.3f} |"
                if seconds[1] <= seconds[0]:  # the machine's noise outweighed the extra steps
                    print(f"{row} {'N/A':>8}  (the longer run was not slower: give --trainer-steps more steps apart)")
                    continue
                rate = (long - short) / (seconds[1] - seconds[0])
                eager = eager or rate
                # 3 significant figures: a loaded machine's 0.15 steps/s is 2.4 images/s, not "2"
                print(f"{row} {rate:8.3g} {rate * batch:9.3g} {rate / eager:7.2f}")


# ---------------------------------------------------------------- 2. bytes

def real_update(trainable: str, rank: int, data, local_epochs: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(the start, the update): weights after one local `train` of the job's defaults minus the start."""
    from jobs import load_job

    job = load_job(ddpm_run(trainable=trainable, lora_rank=rank, local_epochs=local_epochs))
    with placed_on("cpu"):
        start = job.initial_weights()
        after = job.train(start, data.images, data.labels, seed=0, threads=1).weights
    return start, [a - s for a, s in zip(after, start)]


def lora_pairs(arrays: list[np.ndarray], rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A, B) of every adapted layer: the wire order is each layer's lora_A then its lora_B
    (generation.lora), A (rank, in, ...) and B (out, rank, ...)."""
    pairs = list(zip(arrays[0::2], arrays[1::2]))
    if len(arrays) % 2 or any(a.shape[0] != rank or b.shape[1] != rank for a, b in pairs):
        raise ValueError("the LoRA arrays are not (lora_A, lora_B) pairs of this rank")
    return pairs


def lora_product_error(start, update, bits: int, rng) -> float:
    """Relative error of the adapted layers' weight change B A - B0 A0 (alpha = rank: scale 1)
    when the update goes through one real encode/decode at `bits`."""
    rank = start[0].shape[0]
    sent = [s + d for s, d in zip(start, codec.decode(codec.encode(update, bits, rng)))]
    exact = [s + u for s, u in zip(start, update)]
    error = norm = 0.0
    for (a0, b0), (a, b), (a_hat, b_hat) in zip(*(lora_pairs(w, rank) for w in (start, exact, sent))):
        def product(a_, b_):
            return b_.reshape(b_.shape[0], rank).astype(np.float64) @ a_.reshape(rank, -1).astype(np.float64)

        change = product(a, b) - product(a0, b0)
        error += float(np.sum((product(a_hat, b_hat) - product(a0, b0) - change) ** 2))
        norm += float(np.sum(change ** 2))
    return error / norm


def bytes_section(args) -> None:
    run = ddpm_run(local_epochs=args.local_epochs or JOB_DEFAULTS["ddpm"]["local_epochs"])
    node, data = busiest_node(run)
    print(f"\n== 2. bytes per update against M x bits / 8: one real local step (job defaults: "
          f"{run.local_epochs} epochs, batch {run.batch_size}, lr {run.lr}) on node {node}, seed 0 ==")
    print(f"{'update':>9} {'M':>9} {'tensors':>7} {'bits':>4} | {'bytes':>10} {'M*bits/8':>10} {'ratio':>7} "
          f"{'/ full':>7} | {'rel. error':>10} {'err on BA':>9}")
    rng = np.random.default_rng(0)
    full_bytes = {}
    for trainable, rank in [("full", 0)] + [("lora", r) for r in LORA_RANKS]:
        start, update = real_update(trainable, rank or run.lora_rank, data, run.local_epochs)
        sizes = [u.size for u in update]
        m = sum(sizes)
        name = "full" if trainable == "full" else f"lora r{rank}"
        for bits in BITS:
            payload = codec.encode(update, bits, rng)
            assert len(payload) == codec.payload_bytes(sizes, bits)
            full_bytes.setdefault(bits, len(payload))
            model = m * bits / 8
            on_product = "" if trainable == "full" else f"{lora_product_error(start, update, bits, rng):9.2e}"
            print(f"{name:>9} {m:9,} {len(update):7d} {bits:4d} | {len(payload):10,} {model:10,.0f} "
                  f"{len(payload) / model:7.4f} {len(payload) / full_bytes[bits]:7.4f} | "
                  f"{codec.relative_error(update, bits):10.2e} {on_product:>9}")
    print("ratio = bytes / (M x bits / 8), the headers' share; rel. error: of the uploaded tensors (for LoRA the "
          "adapters A, B); err on BA: of the adapted layers' weight change, one real round trip")


# ---------------------------------------------------------------- 3. energy

def compared_policies(directory: Path) -> list[str]:
    """The policies of a compare directory, in summary.json's order, else those with a rounds.csv."""
    summary = directory / "summary.json"
    if summary.exists():
        names = list(json.loads(summary.read_text()).get("policies", {}))
        if names:
            return names
    return sorted(p.name for p in directory.iterdir() if (p / "rounds.csv").exists())


def costs_at_frechet(rows: list[dict], target: float) -> dict | None:
    """The first trained round whose Fréchet distance is at or below `target` (None if none)."""
    return next((r for r in rows if r["round"] > 0 and r["frechet"] <= target), None)


def energy(args) -> None:
    print("\n== 3. energy of ondemand against fixed-8 at equal quality (Fréchet distance) ==")
    if not args.compare:
        print(f"needs a compare directory: make one with `{COMPARE_HINT}` (its policies must include fixed-8 and "
              f"ondemand), then `python bench/bench_diffusion.py --sections energy --compare runs/compare-ddpm`")
        return
    directory = Path(args.compare)
    policies = compared_policies(directory)
    rows = {p: read_rounds(directory / p / "rounds.csv") for p in policies}
    for policy, policy_rows in rows.items():
        if not policy_rows or "frechet" not in policy_rows[-1]:
            raise SystemExit(f"{directory / policy / 'rounds.csv'} has no Fréchet distance: not a ddpm compare")
    finals = {p: r[-1]["frechet"] for p, r in rows.items()}
    if args.frechet_target is None:
        target = max(finals.values())
        source = f"the worst final Fréchet distance ({max(finals, key=finals.get)})"
    else:
        target, source = args.frechet_target, "--frechet-target"
    print(f"{directory}: target Fréchet <= {target:.4f}, {source}")
    hits = {p: costs_at_frechet(r, target) for p, r in rows.items()}
    base = hits.get("fixed-8")
    print(f"{'policy':>10} {'final':>8} | {'round':>5} {'Fréchet':>8} {'energy J':>10} {'uplink MB':>10} | "
          f"{'energy / fixed-8':>16} {'uplink / fixed-8':>16}")
    for policy, hit in hits.items():
        if hit is None:
            print(f"{policy:>10} {finals[policy]:8.4f} | {'N/A':>5} {'':>8} {'':>10} {'':>10} |")
            continue
        ratios = [f"{hit[key] / base[key]:16.3f}" if base and base[key] else f"{'N/A':>16}"
                  for key in ("energy_j", "uplink_bytes")]
        print(f"{policy:>10} {finals[policy]:8.4f} | {hit['round']:5d} {hit['frechet']:8.4f} {hit['energy_j']:10.4g} "
              f"{hit['uplink_bytes'] / 1e6:10.3f} | " + " ".join(ratios))
    ondemand = hits.get("ondemand")
    if base and ondemand:
        print(f"ondemand / fixed-8 at Fréchet <= {target:.4f}: energy {ondemand['energy_j'] / base['energy_j']:.3f}, "
              f"uplink {ondemand['uplink_bytes'] / base['uplink_bytes']:.3f} (rounds {ondemand['round']} and "
              f"{base['round']})")
    else:
        missing = [p for p in ("fixed-8", "ondemand") if p not in hits]
        print("ondemand / fixed-8: N/A (" + (f"{', '.join(missing)} not compared" if missing else
                                             "one of them never reaches the target") + ")")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="speed,bytes,energy,trainer",
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="speed: timed calls per setting, the best counts")
    parser.add_argument("--steps", type=int, default=4, help="speed: local steps per timed call")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128],
                        help="speed: batch sizes (32 is the job's default)")
    parser.add_argument("--trainer-steps", type=int, nargs=2, default=[20, 80], metavar=("SHORT", "LONG"),
                        help="trainer: the two run lengths whose difference is timed")
    parser.add_argument("--trainer-batches", type=int, nargs="+", default=[64, 256, 2048],
                        help="trainer: batch sizes (64 is the shipped checkpoints'; on the CPU only those up to "
                             "--batches' largest)")
    parser.add_argument("--local-epochs", type=int,
                        help=f"bytes: local epochs of the real update (default: the job's, "
                             f"{JOB_DEFAULTS['ddpm']['local_epochs']})")
    parser.add_argument("--compare", help="energy: the output directory of `fedfill compare --job ddpm`")
    parser.add_argument("--frechet-target", type=float,
                        help="energy: the Fréchet distance to reach (default: the worst final one compared)")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        parser.error(f"--sections takes {', '.join(SECTIONS)}; got {args.sections!r}")
    if args.repeat < 1 or args.steps < 1 or min(args.batches + args.trainer_batches) < 1 or (args.local_epochs or 1) < 1:
        parser.error("--repeat, --steps, --batches, --trainer-batches and --local-epochs must be positive")
    if not 0 < args.trainer_steps[0] < args.trainer_steps[1]:
        parser.error("--trainer-steps takes two lengths, the shorter first")
    started = time.perf_counter()
    if {"speed", "bytes", "trainer"} & set(sections):
        quiet_diffusers()
    for section in SECTIONS:
        if section in sections:
            {"speed": speed, "bytes": bytes_section, "energy": energy, "trainer": trainer}[section](args)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
