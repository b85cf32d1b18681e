"""What a GPU must show about the diffusion training step (generation.step), in one command.

    python bench/gpu_check.py --out DIR          # not yet run on a GPU: the eager 3000 steps
                                                 # alone took 122 s on an H100 (issue 12)

1. The full shipped recipe on the GPU, eagerly and as CUDA graphs: `train_generator` on the
   digits public split, 3000 steps at batch 64 (the shipped checkpoint's command), each
   timed, then scored as `fedfill generator evaluate` scores (class fidelity, Fréchet
   distance, 100 samples a class): the graph must train as well as the eager step does.
2. The same seed twice with CUDA graphs, 300 steps: the saved UNet and EMA weights compared
   bit for bit, and the largest difference if they differ.
3. The local fine-tuning step of the ddpm job, the same seed twice on the GPU: the update
   compared bit for bit.

Everything goes to DIR/gpu_check.json and is printed. bench/bench_diffusion.py's speed and
trainer sections give the steps/s per batch; tests/test_step.py the step's own GPU tests.
Refuses to run without a GPU: the CPU path is checked by the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


DEVICE = "cuda"


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def trained_state(out: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    import torch

    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=False)
    return ([v.numpy() for v in state["unet"].values()], [v.numpy() for v in state["ema"]["shadow_params"]])


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b)))


def recipe(split, out: Path, graphs: bool, steps: int) -> dict:
    """The shipped command's training on the GPU, timed, and scored."""
    from generation.checkpoint import load_generator
    from generation.quality import evaluate_generator
    from generation.sample import sample
    from generation.train import train_generator

    sync()
    started = time.perf_counter()
    train_generator(split.public.images, split.public.labels, split.public.class_names, out, steps=steps,
                    batch_size=64, lr=1e-3, seed=0, progress=False, cuda_graphs=graphs)
    sync()
    seconds = time.perf_counter() - started
    config, pipe = load_generator(out)
    labels = np.repeat(np.arange(config.num_classes), 100)
    images = sample(config, pipe.to(DEVICE), labels, steps=50, guidance=2.0, seed=0)
    scores = evaluate_generator(images, labels, split)
    log = json.loads((out / "train_log.json").read_text())
    return {"graphs": graphs, "steps": steps, "seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 1),
            "final_loss": log["final_loss"], "fidelity": scores["fidelity"],
            "frechet": scores["frechet_distance"], "weakest_class": min(scores["fidelity_per_class"].items(),
                                                                         key=lambda item: item[1])}


def repeat_trainer(split, root: Path, steps: int) -> dict:
    from generation.train import train_generator

    states = []
    for k in range(2):
        out = root / f"repeat-{k}"
        train_generator(split.public.images, split.public.labels, split.public.class_names, out, steps=steps,
                        batch_size=64, seed=7, progress=False)
        states.append(trained_state(out))
    (unet_a, ema_a), (unet_b, ema_b) = states
    unets, emas = [digest(unet_a), digest(unet_b)], [digest(ema_a), digest(ema_b)]
    return {"steps": steps, "unet": unets, "ema": emas, "identical": unets[0] == unets[1] and emas[0] == emas[1],
            "largest_difference": largest_difference(unet_a, unet_b)}


def repeat_finetune() -> dict:
    from fedfill.config import JOB_DEFAULTS, RunConfig
    from jobs import load_job

    run = replace(RunConfig(job="ddpm", **JOB_DEFAULTS["ddpm"]), local_epochs=5)
    job = load_job(run)
    data = job.node_data(0, run.num_partitions)
    start = job.initial_weights()
    results = [job.train(start, data.images, data.labels, seed=3) for _ in range(2)]
    updates = [digest(r.weights) for r in results]
    return {"images": len(data), "loss": [r.loss for r in results], "update": updates,
            "identical": updates[0] == updates[1],
            "largest_difference": largest_difference(results[0].weights, results[1].weights)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where gpu_check.json goes")
    parser.add_argument("--steps", type=int, default=3000, help="the recipe's steps (the shipped: 3000)")
    parser.add_argument("--repeat-steps", type=int, default=300)
    parser.add_argument("--dry-run", action="store_true",
                        help="the script's own check, on the CPU with --steps 4 --repeat-steps 2: no figure means anything")
    args = parser.parse_args()
    import torch

    global DEVICE
    if args.dry_run:
        DEVICE, args.steps, args.repeat_steps = "cpu", 4, 2
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no GPU; the CPU path is checked by the test suite")
    from diffusers.utils import logging

    from fedfill.data import load_digits, split_dataset

    logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_dataset(load_digits(), seed=0)
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["recipe"] = [recipe(split, root / f"recipe-{graphs}", graphs, args.steps) for graphs in (False, True)]
        print(json.dumps(report, indent=1), flush=True)
        report["repeat_trainer"] = repeat_trainer(split, root, args.repeat_steps)
        print(json.dumps(report["repeat_trainer"], indent=1), flush=True)
    report["repeat_finetune"] = repeat_finetune()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["repeat_finetune"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
