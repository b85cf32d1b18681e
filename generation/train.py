"""Training the generators on the server's public split: one loop, two models.

`train_generator` trains the class-conditional DDPM: epsilon-prediction loss with diffusers'
DDPMScheduler, AdamW, and label dropout (a label replaced by the null class with probability
p) so that the same network also learns the unconditional score classifier-free guidance
needs. `train_gan` trains FIMI's GAN baseline (generation/gan.py): hinge loss, one
discriminator and one generator update per step.

Both run the same loop (`_train`): diffusers' EMAModel of the weights (what gets saved: it
samples better than the raw weights), a checkpoint and a resumable state every `save_every`
steps (an interrupted run loses at most that much; a resumed run continues the very draws an
uninterrupted one would make), a progress bar and a train_log.json. Each model supplies its
step, its state and its checkpoint writer (a `_Training`).

`classes` trains on the images of some classes only, while the network keeps one class
embedding per class of the dataset (and the null class): a starting generator that has never
seen the other classes and can learn them later (fine-tuning under a domain shift).
"""

from __future__ import annotations

import json
import os
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint, save_gan_checkpoint
from .config import LEGACY_FILES, GeneratorConfig, build_unet
from .step import EpsilonStep, make_generator, make_optimizer, pick_device

# Adam as DCGAN set it for the GAN: lr 2e-4 and beta1 0.5 (a momentum of 0.9 makes the two
# players overshoot each other and oscillate); the DDPM's 1e-3 diverged the adversarial game.
GAN_LR = 2e-4
GAN_BETAS = (0.5, 0.999)


def images_to_model_space(images: np.ndarray):
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x


class _Training(ABC):
    """What one kind of generator supplies to the shared loop."""

    #: the progress bar's label, and the losses a step returns: train_log.json key -> bar label
    name: str
    losses: dict[str, str]

    def __init__(self, config: GeneratorConfig, model, ema, trained_classes: list[int]):
        self.config, self.model, self.ema, self.trained_classes = config, model, ema, trained_classes

    @property
    @abstractmethod
    def architecture(self) -> dict:
        """What must match to resume: the networks and the classes (not steps, lr or batch size)."""

    @abstractmethod
    def resume(self, state: dict) -> None:
        """Take up the networks, optimizers and draws of a saved state."""

    @abstractmethod
    def start(self, step: int) -> None:
        """Ready the first step to run, `step` (0, or where a resumed run takes up)."""

    @abstractmethod
    def step(self):
        """One training step; its losses as a tensor, one per entry of `losses` (read rarely:
        on a GPU, reading a loss waits for the step)."""

    @abstractmethod
    def state(self) -> dict:
        """What `resume` takes, besides the step count, architecture and classes."""

    @abstractmethod
    def save_weights(self, out_dir: Path) -> None:
        """The checkpoint, with `model` holding the weights to ship."""


def _train(training: _Training, out_dir: Path, steps: int, save_every: int, progress: bool) -> GeneratorConfig:
    """The loop both generators train in, resuming from out_dir/train_state.pt if it is there."""
    import torch

    state_path = out_dir / "train_state.pt"
    step = 0
    if state_path.exists():
        device = next(training.model.parameters()).device
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state.get("architecture") != training.architecture:
            raise ValueError(f"{state_path} was written for another model or dataset; use another --out or delete it")
        resumed_classes = state.get("trained_classes", list(range(training.config.num_classes)))  # older: all
        if resumed_classes != training.trained_classes:
            raise ValueError(f"{state_path} was written for training on classes {_spell(resumed_classes)}, "
                             f"this run trains on {_spell(training.trained_classes)}; use another --out or delete it")
        training.resume(state)
        step = state["step"]
    training.start(step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc=training.name, unit="step")
    started, losses = time.perf_counter(), []
    while step < steps:
        losses.append(training.step())  # a tensor on the device: read every 50 steps only
        training.ema.step(training.model.parameters())
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                recent = torch.stack(losses[-50:]).double().mean(dim=0).tolist()
                bar.set_postfix({label: f"{value:.4f}" for label, value in zip(training.losses.values(), recent)})
        if len(losses) > 100:
            del losses[:-100]  # the log keeps the last 100
        if step % save_every == 0 or step == steps:
            training.ema.store(training.model.parameters())  # ship the EMA weights, then train on with the raw ones
            training.ema.copy_to(training.model.parameters())
            training.save_weights(out_dir)
            training.ema.restore(training.model.parameters())
            temporary = state_path.with_name(state_path.name + ".tmp")
            torch.save({**training.state(), "step": step, "architecture": training.architecture,
                        "trained_classes": training.trained_classes}, temporary)
            os.replace(temporary, state_path)  # an interrupted save leaves the previous state whole
    if bar is not None:
        bar.close()
    if losses:
        final = torch.stack(losses).double().mean(dim=0).tolist()
        (out_dir / "train_log.json").write_text(json.dumps(
            {"steps": step, "seconds": time.perf_counter() - started,
             **{f"final_{key}": value for key, value in zip(training.losses, final)}}) + "\n")
    return training.config


class _DdpmTraining(_Training):
    name, losses = "generator", {"loss": "loss"}

    def __init__(self, config, unet, ema, trained_classes, *, optimizer, scheduler, images, labels, seed: int,
                 batch_size: int, label_dropout: float, cuda_graphs: bool):
        super().__init__(config, unet, ema, trained_classes)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.images, self.labels, self.seed, self.batch_size = images, labels, seed, batch_size
        self.label_dropout, self.cuda_graphs = label_dropout, cuda_graphs

    @property
    def architecture(self) -> dict:
        c = self.config
        return {"image_size": c.image_size, "channels": c.channels, "num_classes": c.num_classes,
                "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
                "train_timesteps": c.train_timesteps, "class_names": list(c.class_names)}

    def resume(self, state: dict) -> None:
        import torch

        self.model.load_state_dict(state["unet"])
        _load_ema(self.ema, state["ema"], self.model, step=state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    def start(self, step: int) -> None:
        import torch

        device = next(self.model.parameters()).device
        self.x_all = images_to_model_space(self.images).to(device)
        self.y_all = torch.as_tensor(self.labels, dtype=torch.long, device=device)
        self.generator = make_generator(self.seed + step, device.type)
        self.train_step = EpsilonStep(self.model, self.optimizer, self.scheduler, self.generator,
                                      null_class=self.config.null_class, label_dropout=self.label_dropout,
                                      cuda_graphs=self.cuda_graphs)

    def step(self):
        import torch

        idx = torch.randint(0, len(self.y_all), (self.batch_size,), generator=self.generator,
                            device=self.generator.device)
        return self.train_step(self.x_all, self.y_all, idx).reshape(1)

    def state(self) -> dict:
        import torch

        return {"unet": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state()}

    def save_weights(self, out_dir: Path) -> None:
        save_checkpoint(out_dir, self.config, self.model, noise_schedule=self.scheduler.config)
        for stale in LEGACY_FILES:  # a run begun before the pipeline layout: its old files hold older weights
            (out_dir / stale).unlink(missing_ok=True)


def train_generator(images: np.ndarray, labels: np.ndarray, class_names, out_dir: str | Path, *, steps: int = 4000,
                    batch_size: int = 128, lr: float = 1e-3, ema_decay: float = 0.999, label_dropout: float = 0.1,
                    seed: int = 0, save_every: int = 500, block_out_channels=(32, 64), command: str = "",
                    dataset: str = "", data_dir: str = "", split_seed: int | None = None, progress: bool = True,
                    threads: int = 0, classes=None, cuda_graphs: bool = True) -> GeneratorConfig:
    """Train the DDPM and save it to `out_dir` (resuming from its train_state.pt if there is one).

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
    training = _DdpmTraining(config, unet, ema, trained_classes, optimizer=make_optimizer(unet.parameters(), lr, device),
                             scheduler=DDPMScheduler(num_train_timesteps=config.train_timesteps), images=images,
                             labels=labels, seed=seed, batch_size=batch_size, label_dropout=label_dropout,
                             cuda_graphs=cuda_graphs)
    return _train(training, out_dir, steps, save_every, progress)


class _GanTraining(_Training):
    name, losses = "gan", {"loss_discriminator": "loss_d", "loss_generator": "loss_g"}

    def __init__(self, config, generator, ema, trained_classes, *, discriminator, optimizers, images, labels,
                 seed: int, batch_size: int, latent_dim: int):
        import torch

        super().__init__(config, generator, ema, trained_classes)
        self.discriminator, self.optimizers = discriminator, optimizers
        self.images, self.labels, self.batch_size, self.latent_dim = images, labels, batch_size, latent_dim
        self.draws = torch.Generator().manual_seed(seed)

    @property
    def architecture(self) -> dict:
        return {"model": "gan", "image_size": self.images.shape[1], "channels": self.images.shape[3],
                "latent_dim": self.latent_dim, "widths": list(self.config.block_out_channels),
                "class_names": list(self.config.class_names)}

    def resume(self, state: dict) -> None:
        self.model.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.draws.set_state(state["draws"])

    def start(self, step: int) -> None:
        import torch

        self.device = next(self.model.parameters()).device
        self.real_images = images_to_model_space(self.images).to(self.device)
        self.real_labels = torch.as_tensor(self.labels, dtype=torch.long, device=self.device)
        self.fake_classes = torch.as_tensor(self.trained_classes, dtype=torch.long, device=self.device)

    def step(self):
        import torch

        generator, discriminator, draws, n = self.model, self.discriminator, self.draws, self.batch_size
        index = torch.randint(0, len(self.real_labels), (n,), generator=draws).to(self.device)
        latents = torch.randn(n, self.latent_dim, generator=draws).to(self.device)
        wanted = self.fake_classes[torch.randint(0, len(self.fake_classes), (n,), generator=draws).to(self.device)]
        fakes = generator(latents, wanted)
        loss_d = (torch.relu(1 - discriminator(self.real_images[index], self.real_labels[index])).mean()
                  + torch.relu(1 + discriminator(fakes.detach(), wanted)).mean())
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizers["discriminator"].step()
        loss_g = -discriminator(fakes, wanted).mean()
        self.optimizers["generator"].zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizers["generator"].step()
        return torch.stack([loss_d.detach(), loss_g.detach()])

    def state(self) -> dict:
        return {"generator": self.model.state_dict(), "discriminator": self.discriminator.state_dict(),
                "ema": self.ema.state_dict(), "draws": self.draws.get_state(),
                "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}}

    def save_weights(self, out_dir: Path) -> None:
        save_gan_checkpoint(out_dir, self.config, self.model)


def train_gan(images: np.ndarray, labels: np.ndarray, class_names, out_dir: str | Path, *, steps: int = 3000,
              batch_size: int = 64, lr: float = GAN_LR, betas: tuple[float, float] = GAN_BETAS,
              ema_decay: float = 0.999, latent_dim: int | None = None, widths=None, seed: int = 0,
              save_every: int = 500, command: str = "", dataset: str = "", data_dir: str = "",
              split_seed: int | None = None, progress: bool = True, threads: int = 0, classes=None) -> GeneratorConfig:
    """Train the GAN and save its generator to `out_dir` (resuming from train_state.pt there).

    Each step: one discriminator update on a real batch and a fake batch of uniformly drawn
    trained classes, then one generator update, hinge loss. Arguments and provenance as
    train_generator's.
    """
    import torch
    from diffusers.training_utils import EMAModel

    from .gan import GAN_LATENT_DIM, GanGenerator, ProjectionDiscriminator, default_widths

    if threads:
        torch.set_num_threads(threads)
    latent_dim = GAN_LATENT_DIM if latent_dim is None else latent_dim
    num_classes = len(class_names)
    trained_classes = check_classes(classes, num_classes)
    keep = np.isin(labels, trained_classes)
    images, labels = images[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError(f"no images of classes {trained_classes} to train on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    torch.manual_seed(seed)
    widths = tuple(widths) if widths else default_widths(images.shape[1])  # written out in config.json
    generator = GanGenerator(image_size=images.shape[1], channels=images.shape[3], num_classes=num_classes,
                             latent_dim=latent_dim, widths=widths).to(device)
    discriminator = ProjectionDiscriminator(images.shape[3], num_classes, tuple(reversed(widths))).to(device)
    config = GeneratorConfig(image_size=images.shape[1], channels=images.shape[3], num_classes=num_classes,
                             block_out_channels=widths, class_names=tuple(class_names), model="gan",
                             provenance={"command": command, "model": "gan", "seed": seed, "steps": steps,
                                         "batch_size": batch_size, "lr": lr, "betas": list(betas),
                                         "ema_decay": ema_decay, "loss": "hinge", "latent_dim": latent_dim,
                                         "train_images": int(len(labels)), "dataset": dataset,
                                         "data_dir": data_dir, "split_seed": split_seed,
                                         "trained_classes": trained_classes})
    ema = EMAModel(generator.parameters(), decay=ema_decay)
    optimizers = {"generator": torch.optim.Adam(generator.parameters(), lr=lr, betas=betas),
                  "discriminator": torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)}
    training = _GanTraining(config, generator, ema, trained_classes, discriminator=discriminator,
                            optimizers=optimizers, images=images, labels=labels, seed=seed, batch_size=batch_size,
                            latent_dim=latent_dim)
    return _train(training, out_dir, steps, save_every, progress)


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


def _load_ema(ema, saved: dict, unet, step: int) -> None:
    """EMAModel's state, or a train_state.pt from before EMAModel, whose "ema" was the EMA
    network's state dict (its n-th update then is EMAModel's n-th: same decays)."""
    if "shadow_params" not in saved:  # EMAModel.load_state_dict would ignore it and keep fresh weights
        names = [name for name, _ in unet.named_parameters()]
        if set(names) != set(saved):
            raise ValueError("train_state.pt holds an EMA of another network; use another --out or delete it")
        saved = {"optimization_step": int(step), "shadow_params": [saved[name].clone() for name in names]}
    ema.load_state_dict(saved)
