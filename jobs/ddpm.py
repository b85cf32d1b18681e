"""The ddpm job: federated fine-tuning of the class-conditional DDPM ([ODQ]).

The server starts from a pretrained generator; every device fine-tunes it on its own
labelled images with the epsilon-prediction loss it was trained with (generation.train:
diffusers' DDPMScheduler, AdamW, label dropout to the null class so classifier-free
guidance keeps working), and uploads its update through the codec at its plan's bits. The
embedded default is a domain shift like [ODQ]'s CIFAR-10 -> GTSRB: the starting
checkpoint (checkpoints/digits-0to4) saw only digits 0-4, the devices hold all ten, so
fine-tuning must teach the model digits it never drew.

`trainable = "full"` exchanges every UNet weight; `"lora"` exchanges only LoRA adapters on
its attention and convolution layers (generation.lora, peft), the base staying the start.

Every round the server draws `eval_per_class` samples of every class (DDIM, the run's
generator steps and guidance, a fixed seed) and scores them with a reference classifier
trained on real client images (generation.quality): class fidelity and the Fréchet
distance in its feature space to the real test images, over all classes and over the
classes the start never saw; the standard Inception FID when the detector file is given.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from fedfill.config import RunConfig
from jobs import Job, LocalResult, held_out, run_split

from generation.config import CheckpointError, shipped_checkpoint
from generation.step import EpsilonStep, make_generator, make_optimizer, pick_device

LABEL_DROPOUT = 0.1  # as the start was trained: keeps the unconditional score guidance needs
TRAINABLE = ("full", "lora")


def start_checkpoint(run: RunConfig) -> Path:
    """The generator this run fine-tunes: the one it names, else the one shipped for its dataset."""
    if run.start_checkpoint:
        return Path(run.start_checkpoint)
    try:
        return shipped_checkpoint(run.dataset, "start")
    except CheckpointError as err:
        raise CheckpointError(f"{err}, and pass --start-checkpoint DIR") from None


def check_run(run: RunConfig) -> None:
    """Everything about a ddpm run that can be wrong before it starts, as CheckpointError (a
    ValueError) or ValueError with the reason: the start checkpoint, its fit to the data, the
    LoRA settings."""
    if run.trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {run.trainable!r}")
    if run.trainable == "lora" and (isinstance(run.lora_rank, bool) or run.lora_rank < 1):
        raise ValueError(f"LoRA rank must be a positive integer, got {run.lora_rank}")
    if run.eval_per_class < 2:
        raise ValueError(f"--eval-per-class must be at least 2 (a Fréchet distance needs a spread), got "
                         f"{run.eval_per_class}")
    if run.inception and not Path(run.inception).is_file():
        raise ValueError(f"no Inception detector at {run.inception}")
    _start(run)


@functools.lru_cache(maxsize=2)
def _start(run: RunConfig):
    """(config, pipeline, the classes it was trained on) of the start, checked against the data."""
    from generation.checkpoint import load_generator

    path = start_checkpoint(run)
    config, pipe = load_generator(path)
    if config.model != "ddpm":
        raise CheckpointError(f"{path} is a {config.model.upper()} generator; the ddpm job fine-tunes a diffusion "
                              "model's UNet (a checkpoint of `fedfill generator train`, --model ddpm)")
    test = held_out(run).test
    if config.num_classes != test.num_classes:
        raise CheckpointError(f"{path} draws {config.num_classes} classes, {run.dataset} has {test.num_classes}")
    if (config.image_size, config.image_size, config.channels) != test.images.shape[1:]:
        raise CheckpointError(f"{path} draws {config.image_size}x{config.image_size}x{config.channels} images, "
                              f"{run.dataset}'s are {'x'.join(map(str, test.images.shape[1:]))}")
    trained = config.provenance.get("trained_classes", list(range(config.num_classes)))
    return config, pipe, tuple(int(c) for c in trained)


class DiffusionJob(Job):
    preset = "ondemand"
    check = staticmethod(check_run)

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self.metrics = ("fidelity", "frechet", "fidelity_unseen", "frechet_unseen") + (("fid",) if run.inception else ())

    # ------------------------------------------------------------------ the model
    def _unet(self, weights: list[np.ndarray] | None = None):
        """A fresh copy of the start's UNet (with its adapters under LoRA), holding `weights`
        (the exchanged tensors) when given, on the GPU when there is one."""
        import copy

        import torch

        _, pipe, _ = _start(self.run)
        unet = copy.deepcopy(pipe.unet)
        if self.run.trainable == "lora":
            from generation.lora import add_lora

            unet = add_lora(unet, self.run.lora_rank, seed=self.run.seed)
        if weights is not None:
            self._set(unet, weights)
        return unet.to(pick_device()).to(torch.float32)

    def _get(self, unet) -> list[np.ndarray]:
        if self.run.trainable == "lora":
            from generation.lora import trainable_arrays

            return trainable_arrays(unet)
        return [p.detach().cpu().numpy().copy() for p in unet.parameters()]

    def _set(self, unet, weights: list[np.ndarray]) -> None:
        import torch

        if self.run.trainable == "lora":
            from generation.lora import set_trainable_arrays

            set_trainable_arrays(unet, weights)
            return
        params = list(unet.parameters())
        if len(params) != len(weights):
            raise ValueError(f"{len(weights)} tensors for a UNet of {len(params)}")
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)).reshape(p.shape))

    def initial_weights(self) -> list[np.ndarray]:
        return self._get(self._unet())

    def compute_params(self) -> int:
        """Every step runs through the whole UNet, adapters or not: LoRA saves upload and
        optimizer work, not the forward and backward passes the cycles per sample count."""
        return int(sum(p.numel() for p in self._unet().parameters()))

    # ------------------------------------------------------------------ a device's step
    def train(self, weights, images, labels, *, seed: int, threads: int = 1) -> LocalResult:
        """tau epochs of epsilon-prediction steps on the local images (shuffled batches),
        AdamW at the run's lr (generation.step: replayed as a CUDA graph on a GPU). A NaN
        loss stops the step with ValueError (the update is dropped with the reason; the
        round goes on)."""
        import torch
        from diffusers import DDPMScheduler

        from generation.train import images_to_model_space

        config, pipe, _ = _start(self.run)
        torch.set_num_threads(threads)
        device = pick_device()
        unet = self._unet(weights).train()
        trainable = [p for p in unet.parameters() if p.requires_grad]
        generator = make_generator(seed, device)
        step = EpsilonStep(unet, make_optimizer(trainable, self.run.lr, device),
                           DDPMScheduler.from_config(pipe.scheduler.config), generator,
                           null_class=config.null_class, label_dropout=LABEL_DROPOUT, cuda_graphs=not self.run.eager_gpu_steps)
        x_all = images_to_model_space(images).to(device)
        y_all = torch.as_tensor(labels, dtype=torch.long, device=device)
        batch = min(self.run.batch_size, len(y_all))
        losses = []
        started = time.perf_counter()
        for _ in range(self.run.local_epochs):
            order = torch.randperm(len(y_all), generator=generator, device=generator.device)
            for first in range(0, len(order) - batch + 1, batch):  # whole batches: static shapes
                losses.append(step(x_all, y_all, order[first:first + batch]))
        seconds = time.perf_counter() - started
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        if losses and not np.isfinite(mean_loss):
            bad = next(k for k, value in enumerate(losses) if not torch.isfinite(value))
            raise ValueError(f"the diffusion loss became {float(losses[bad])} at local step {bad + 1} "
                             f"(lr {self.run.lr}): no update sent")
        return LocalResult(self._get(unet), mean_loss, seconds)

    # ------------------------------------------------------------------ the server's view
    @functools.cached_property
    def _judge(self):
        """The reference classifier (trained on real client images), the test split and its
        images' features: made once per run."""
        from generation.quality import ReferenceClassifier

        split = run_split(self.run)
        reference = ReferenceClassifier(split.clients.images, split.clients.labels, self.run.seed)
        return reference, split.test, reference.features(split.test.images)

    def sample(self, weights, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`per_class` images of every class from the global weights (DDIM on the start's
        noise schedule, the run's steps and guidance, the run's seed): uint8 NHWC and labels."""
        from generation.pipeline import ClassConditionalPipeline
        from generation.sample import sample

        config, pipe, _ = _start(self.run)
        unet = self._unet(weights).eval()
        runner = ClassConditionalPipeline(unet=unet, scheduler=pipe.scheduler)
        labels = np.repeat(np.arange(config.num_classes), per_class or self.run.eval_per_class)
        images = sample(config, runner, labels, steps=self.run.generator_steps, guidance=self.run.generator_guidance,
                        seed=self.run.seed)
        return images, labels

    def evaluate(self, weights) -> dict[str, float]:
        from generation.quality import frechet_distance

        _, _, trained = _start(self.run)
        reference, test, test_features = self._judge
        images, labels = self.sample(weights)
        features = reference.features(images)
        correct = reference.predict(images) == labels
        unseen = np.isin(labels, trained, invert=True)
        unseen_test = np.isin(test.labels, trained, invert=True)
        out = {"fidelity": float(correct.mean()), "frechet": frechet_distance(features, test_features),
               # nan when the start saw every class: nothing unseen to score
               "fidelity_unseen": float(correct[unseen].mean()) if unseen.any() else float("nan"),
               "frechet_unseen": (frechet_distance(features[unseen], test_features[unseen_test])
                                  if unseen.any() else float("nan"))}
        if self.run.inception:
            from generation.quality import inception_fid

            out["fid"] = inception_fid(images, test.images, self.run.inception)
        return out

    def save(self, weights, out_dir) -> str:
        """The fine-tuned generator as a pipeline directory (LoRA merged in), which the
        generation service and diffusers load like the shipped one."""
        from dataclasses import replace

        from generation.checkpoint import save_checkpoint

        config, pipe, trained = _start(self.run)
        unet = self._unet(weights).to("cpu")
        if self.run.trainable == "lora":
            from generation.lora import merged_unet

            unet = merged_unet(unet)
        target = Path(out_dir) / "generator"
        provenance = {"fine_tuned_from": str(start_checkpoint(self.run)), "start_trained_classes": list(trained),
                      "trained_classes": list(range(config.num_classes)), "dataset": self.run.dataset,
                      "data_dir": self.run.data_dir, "split_seed": self.run.seed, "federated": {
                          "policy": self.run.policy, "rounds": self.run.rounds, "nodes": self.run.num_partitions,
                          "trainable": self.run.trainable, "lr": self.run.lr, "local_epochs": self.run.local_epochs}}
        save_checkpoint(target, replace(config, provenance=provenance), unet, noise_schedule=pipe.scheduler.config)
        return str(target)
