"""DDPM training of the class-conditional generator on the server's public split.

Epsilon-prediction loss with diffusers' DDPMScheduler, AdamW, diffusers' EMAModel of the
weights (what gets saved: it samples better than the raw weights), and label dropout (a
label replaced by the null class with probability p) so that the same network also learns
the unconditional score that classifier-free guidance needs. It saves a resumable state
every `save_every` steps: an interrupted run loses at most that much.

`classes` trains on the images of some classes only, while the UNet keeps one class
embedding per class of the dataset (and the null class): a starting generator that has never
seen the other classes and can learn them later (fine-tuning under a domain shift).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from .model import LEGACY_FILES, GeneratorConfig, build_unet, save_checkpoint
from .step import EpsilonStep, make_generator, make_optimizer, pick_device


def images_to_model_space(images: np.ndarray):
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x


def train_generator(images: np.ndarray, labels: np.ndarray, class_names, out_dir: str | Path, *, steps: int = 4000,
                    batch_size: int = 128, lr: float = 1e-3, ema_decay: float = 0.999, label_dropout: float = 0.1,
                    seed: int = 0, save_every: int = 500, block_out_channels=(32, 64), command: str = "",
                    dataset: str = "", data_dir: str = "", split_seed: int | None = None, progress: bool = True,
                    threads: int = 0, classes=None, cuda_graphs: bool = True) -> GeneratorConfig:
    """Train and save to `out_dir` (resuming from its train_state.pt if there is one).

    dataset, data_dir and split_seed say where `images` came from; they go into the
    checkpoint's provenance so that `fedfill generator evaluate` scores against that data.
    classes: the class indices to train on (default: all of `class_names`); the network still
    has every class. Recorded as provenance "trained_classes" (the full list by default).
    cuda_graphs: on a GPU, replay each step as a CUDA graph (generation.step); no effect on the CPU.
    """
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    if threads:
        torch.set_num_threads(threads)
    num_classes = len(class_names)
    trained_classes = check_classes(classes, num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    if len(trained_classes) < num_classes:  # all classes: the arrays as given, so the same draws as ever
        keep = np.isin(labels, trained_classes)
        images, labels = images[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError(f"no images of classes {trained_classes} to train on")
    config = GeneratorConfig(image_size=images.shape[1], channels=images.shape[3], num_classes=num_classes,
                             block_out_channels=tuple(block_out_channels), class_names=tuple(class_names),
                             provenance={"command": command, "seed": seed, "steps": steps, "batch_size": batch_size,
                                         "lr": lr, "ema_decay": ema_decay, "label_dropout": label_dropout,
                                         "train_images": int(len(labels)), "dataset": dataset,
                                         "data_dir": data_dir, "split_seed": split_seed,
                                         "trained_classes": trained_classes})
    torch.manual_seed(seed)
    unet = build_unet(config).to(device)
    # EMAModel's decay is ours, min(ema_decay, (1 + n) / (10 + n)) at update n = 0, 1, ..., except at
    # n = 0, where it copies the weights (ours kept 10% of the initial ones there). On a GPU its update
    # runs as a few multi-tensor kernels (foreach); on the CPU as it always did, tensor by tensor.
    ema = EMAModel(unet.parameters(), decay=ema_decay, foreach=device == "cuda")
    optimizer = make_optimizer(unet.parameters(), lr, device)
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps)
    state_path = out_dir / "train_state.pt"
    step = 0
    if state_path.exists():  # resume
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["architecture"] != _architecture(config):
            raise ValueError(f"{state_path} was written for another model or dataset; use another --out or delete it")
        resumed_classes = state.get("trained_classes", list(range(num_classes)))  # older states: all classes
        if resumed_classes != trained_classes:
            raise ValueError(f"{state_path} was written for training on classes {_spell(resumed_classes)}, "
                             f"this run trains on {_spell(trained_classes)}; use another --out or delete it")
        unet.load_state_dict(state["unet"])
        _load_ema(ema, state["ema"], unet, step=state["step"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    x_all = images_to_model_space(images).to(device)
    y_all = torch.as_tensor(labels, dtype=torch.long, device=device)
    generator = make_generator(seed + step, device)
    train_step = EpsilonStep(unet, optimizer, scheduler, generator, null_class=config.null_class,
                             label_dropout=label_dropout, cuda_graphs=cuda_graphs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc="generator", unit="step")
    started, losses = time.perf_counter(), []
    while step < steps:
        idx = torch.randint(0, len(y_all), (batch_size,), generator=generator, device=generator.device)
        losses.append(train_step(x_all, y_all, idx))  # a tensor on the device: read every 50 steps only
        ema.step(unet.parameters())
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(torch.stack(losses[-50:]).mean()):.4f}")
        if len(losses) > 100:
            del losses[:-100]  # the log keeps the last 100
        if step % save_every == 0 or step == steps:
            ema.store(unet.parameters())  # ship the EMA weights, then train on with the raw ones
            ema.copy_to(unet.parameters())
            save_checkpoint(out_dir, config, unet, noise_schedule=scheduler.config)
            ema.restore(unet.parameters())
            for stale in LEGACY_FILES:  # a run begun before the pipeline layout: its old files hold older weights
                (out_dir / stale).unlink(missing_ok=True)
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "step": step, "architecture": _architecture(config),
                        "trained_classes": trained_classes}, tmp)
            os.replace(tmp, state_path)  # an interrupted save leaves the previous state whole
    if bar is not None:
        bar.close()
    if losses:
        (out_dir / "train_log.json").write_text(json.dumps(
            {"steps": step, "seconds": time.perf_counter() - started,
             "final_loss": float(torch.stack(losses).mean())}) + "\n")
    return config


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """"0,1,2,3,4", "0-4" or a mix ("0-2,7") -> sorted class indices of a dataset of
    `num_classes` classes; ValueError saying what is wrong with a malformed or empty spec, an
    unknown class or a class named twice."""
    classes: list[int] = []
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or all(not item for item in items):
        raise ValueError("--classes is empty: give class indices such as 0,1,2,3,4 or 0-4")
    for item in items:
        match = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", item)
        if match is None:
            raise ValueError(f"--classes {spec!r}: {item!r} is not a class index (N) or a range (N-M)")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise ValueError(f"--classes {spec!r}: the range {item!r} runs backwards")
        if last >= num_classes:  # before expanding the range: "0-99999999999" is refused, not built
            raise ValueError(f"--classes {spec!r}: unknown class {last}, "
                             f"the dataset has classes 0..{num_classes - 1}")
        classes.extend(range(first, last + 1))
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ValueError(f"--classes {spec!r} names class{'es' if len(twice) > 1 else ''} "
                         f"{', '.join(map(str, twice))} twice")
    return sorted(classes)


def check_classes(classes, num_classes: int) -> list[int]:
    """The trained classes as a sorted list of distinct ints in 0..num_classes-1 (None: all)."""
    if classes is None:
        return list(range(num_classes))
    chosen = [int(c) for c in classes]
    if not chosen:
        raise ValueError("no classes to train on")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"classes {chosen}: a class named twice")
    unknown = [c for c in chosen if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]}: the dataset has classes 0..{num_classes - 1}")
    return sorted(chosen)


def _spell(classes: list[int]) -> str:
    return ",".join(map(str, classes))


def _architecture(config: GeneratorConfig) -> dict:
    """What must match to resume: the network and its classes (not steps, lr or batch size)."""
    return {"image_size": config.image_size, "channels": config.channels, "num_classes": config.num_classes,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "train_timesteps": config.train_timesteps, "class_names": list(config.class_names)}


def _load_ema(ema, saved: dict, unet, step: int) -> None:
    """EMAModel's state, or a train_state.pt from before EMAModel, whose "ema" was the EMA
    network's state dict (its n-th update then is EMAModel's n-th: same decays)."""
    if "shadow_params" not in saved:  # EMAModel.load_state_dict would ignore it and keep fresh weights
        names = [name for name, _ in unet.named_parameters()]
        if set(names) != set(saved):
            raise ValueError("train_state.pt holds an EMA of another network; use another --out or delete it")
        saved = {"optimization_step": int(step), "shadow_params": [saved[name].clone() for name in names]}
    ema.load_state_dict(saved)
