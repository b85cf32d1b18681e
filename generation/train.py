"""DDPM training of the class-conditional generator on the server's public split.

Epsilon-prediction loss with diffusers' DDPMScheduler, AdamW, an EMA of the weights, and
label dropout (a label replaced by the null class with probability p) so that the same
network also learns the unconditional score that classifier-free guidance needs. It saves
a resumable state every `save_every` steps: an interrupted run loses at most that much.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from .model import GeneratorConfig, build_unet, save_checkpoint


def images_to_model_space(images: np.ndarray):
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x


def train_generator(images: np.ndarray, labels: np.ndarray, class_names, out_dir: str | Path, *, steps: int = 4000,
                    batch_size: int = 128, lr: float = 1e-3, ema_decay: float = 0.999, label_dropout: float = 0.1,
                    seed: int = 0, save_every: int = 500, block_out_channels=(32, 64), command: str = "",
                    progress: bool = True, threads: int = 0) -> GeneratorConfig:
    import torch
    from diffusers import DDPMScheduler

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_classes = len(class_names)
    config = GeneratorConfig(image_size=images.shape[1], channels=images.shape[3], num_classes=num_classes,
                             block_out_channels=tuple(block_out_channels), class_names=tuple(class_names),
                             provenance={"command": command, "seed": seed, "steps": steps, "batch_size": batch_size,
                                         "lr": lr, "ema_decay": ema_decay, "label_dropout": label_dropout,
                                         "train_images": int(len(labels))})
    torch.manual_seed(seed)
    unet = build_unet(config).to(device)
    ema = copy.deepcopy(unet).eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=config.train_timesteps)
    state_path = out_dir / "train_state.pt"
    step = 0
    if state_path.exists():  # resume
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["architecture"] != _architecture(config):
            raise ValueError(f"{state_path} was written for another model or dataset; use another --out or delete it")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    x_all = images_to_model_space(images).to(device)
    y_all = torch.as_tensor(labels, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed + step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc="generator", unit="step")
    started, losses = time.perf_counter(), []
    while step < steps:
        idx = torch.randint(0, len(y_all), (batch_size,), generator=generator).to(device)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch_size, generator=generator).to(device) < label_dropout] = config.null_class
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, config.train_timesteps, (batch_size,), generator=generator).to(device)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - decay)
        step += 1
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % save_every == 0 or step == steps:
            save_checkpoint(out_dir, config, ema.state_dict())
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "step": step, "architecture": _architecture(config)}, state_path)
    if bar is not None:
        bar.close()
    if losses:
        (out_dir / "train_log.json").write_text(json.dumps(
            {"steps": step, "seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-100:]))}) + "\n")
    return config


def _architecture(config: GeneratorConfig) -> dict:
    """What must match to resume: the network and its classes (not steps, lr or batch size)."""
    return {"image_size": config.image_size, "channels": config.channels, "num_classes": config.num_classes,
            "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
            "train_timesteps": config.train_timesteps, "class_names": list(config.class_names)}
