"""Sampling many images: the checkpoint's pipeline (which holds the maths) over batches. For a
diffusion model the sampler is picked by name (DDIM, DPM-Solver++ or 1000-step DDPM); a GAN
has one forward pass and ignores steps, guidance and sampler.

Determinism rule, which the service's cache relies on: one torch.Generator per batch of
`batch_size`, seeded seed * 1_000_003 + the batch's first index, so the same seed and request
give the same images, and a batch's images do not depend on how many came before it in the
same process.

Split sampling [MEG]: `sample_until` runs the first steps of the same batches and returns the
intermediate states; `complete` runs the rest from (possibly quantized or noisy) states. With
exact states the two make `sample`'s images bit for bit on one platform. A hand-off that added
noise of per-element variance s2 resumes where the noise belongs (`resume_point`): the
received y = x_t + n, rescaled to y / sqrt(1 + s2), is a forward-process sample at the
timestep whose alpha-bar is alpha-bar_t / (1 + s2) (design note F-1, F-2). Only DDIM splits:
it draws no noise while stepping and keeps no history (DPM-Solver's multistep does).
`complete_sketch` is the sketch hand-off: an upsampled low-resolution image noised to the
resume timestep, then the rest of the grid with the class label (SDEdit).
"""

from __future__ import annotations

import numpy as np

from .pipeline import SAMPLERS, ClassConditionalPipeline, make_scheduler

__all__ = ["SAMPLERS", "SPLIT_SAMPLER", "complete", "complete_sketch", "make_scheduler", "resume_point", "sample",
           "sample_until"]

SPLIT_SAMPLER = "ddim"  # the one sampler a run can be split in (see above)
SKETCH_NOISE_STREAM = 1  # the sketch's re-noising draws from a stream of its own (_stream_generator)


def _runner(config, pipe, sampler: str):
    """The pipeline to sample with: a GAN's own, or ours with the named sampler swapped in,
    diffusers style (the caller's pipeline keeps its scheduler)."""
    if config.model == "gan":
        return pipe
    scheduler = make_scheduler(sampler, pipe.scheduler.config)
    runner = ClassConditionalPipeline(**{**pipe.components, "scheduler": scheduler})
    runner.set_progress_bar_config(disable=True)
    return runner


def _batch_generator(seed: int, start: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + start)


def _stream_generator(seed: int, start: int, stream: int):
    """A generator for other draws of a batch than its sampling noise. Not an offset of
    _batch_generator's seed: torch's CPU generator keeps only a seed's low 32 bits (an offset
    of 2**62 drew the very noise the batch was sampled from), so the three numbers are hashed."""
    import torch

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start, stream]).generate_state(1)[0]))


def sample(config, pipe, labels, *, steps: int = 20, guidance: float = 2.0, seed: int = 0, sampler: str = "ddim",
           batch_size: int = 256, first_index: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, C] of the given class labels (config and pipe from load_generator).
    first_index: where these labels start in their request, a multiple of batch_size: the
    images are then those of the whole request, bit for bit (the service samples in slices)."""
    _check_slice(first_index, batch_size)
    labels = pipe.check_class_labels(labels)
    runner = _runner(config, pipe, sampler)
    out = []
    for start in range(0, len(labels), batch_size):
        out.append(runner(labels[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          generator=_batch_generator(seed, first_index + start), output_type="uint8").images)
    if not out:
        return np.zeros((0, config.image_size, config.image_size, config.channels), np.uint8)
    return np.concatenate(out)


def _check_slice(first_index: int, batch_size: int) -> None:
    if first_index < 0 or first_index % batch_size:
        raise ValueError(f"a slice starts at a batch boundary (a multiple of {batch_size}), not at {first_index}")


def _check_split(config, steps: int, resume_index: int) -> None:
    if config.model != "ddpm":
        raise ValueError("a GAN draws an image in one pass: there are no sampler steps to split")
    if not 1 <= resume_index <= steps - 1:
        raise ValueError(f"the hand-off step must be in 1..{steps - 1} of {steps} sampler steps, got {resume_index}")


def sample_until(config, pipe, labels, *, steps: int = 20, guidance: float = 2.0, seed: int = 0,
                 stop_index: int, batch_size: int = 256, first_index: int = 0) -> np.ndarray:
    """float32 states [N, C, H, W] after the first `stop_index` of `steps` DDIM steps of the
    very batches `sample` draws (the server's half of a split run); first_index as sample's."""
    _check_split(config, steps, stop_index)
    _check_slice(first_index, batch_size)
    labels = pipe.check_class_labels(labels)
    runner = _runner(config, pipe, SPLIT_SAMPLER)
    out = [runner(labels[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                  generator=_batch_generator(seed, first_index + start), output_type="state", stop_index=stop_index
                  ).images.float().numpy() for start in range(0, len(labels), batch_size)]
    if not out:
        return np.zeros((0, config.channels, config.image_size, config.image_size), np.float32)
    return np.concatenate(out)


def resume_point(scheduler, timestep: int, noise_var: float) -> tuple[int, float]:
    """(t', scale): where a state x_t received with added noise of per-element variance
    `noise_var` resumes, and the factor 1 / sqrt(1 + noise_var) it is scaled by first. t' is the
    training timestep whose alpha-bar is nearest alpha-bar_t / (1 + noise_var) (F-2)."""
    alphas = scheduler.alphas_cumprod.double().numpy()
    target = alphas[int(timestep)] / (1.0 + noise_var)
    resumed = int(np.argmin(np.abs(alphas - target)))
    return max(resumed, int(timestep)), float(1.0 / np.sqrt(1.0 + noise_var))


def complete(config, pipe, states: np.ndarray, labels, *, steps: int = 20, guidance: float = 2.0,
             resume_index: int, noise_var: float = 0.0, naive: bool = False, batch_size: int = 256) -> np.ndarray:
    """uint8 images [N, H, W, C] from states handed over after `resume_index` of `steps` DDIM
    steps (the device's half). noise_var: per-element variance the hand-off added (the codec's
    expected error, a channel's noise); the states then resume at resume_point's timestep,
    unless `naive` (the ablation: resume at the hand-off step as if nothing was added)."""
    import torch

    _check_split(config, steps, resume_index)
    labels = pipe.check_class_labels(labels)
    states = np.asarray(states, dtype=np.float32)
    if states.shape != (len(labels), config.channels, config.image_size, config.image_size):
        raise ValueError(f"states of shape {states.shape} do not fit {len(labels)} images of "
                         f"{config.channels}x{config.image_size}x{config.image_size}")
    if not np.isfinite(states).all():
        raise ValueError("the states hold NaN or infinite values")
    if not (np.isfinite(noise_var) and noise_var >= 0):
        raise ValueError(f"noise_var must be finite and >= 0, got {noise_var}")
    runner = _runner(config, pipe, SPLIT_SAMPLER)
    where = {"start_index": resume_index}
    scale = 1.0
    if noise_var > 0 and not naive:
        runner.scheduler.set_timesteps(steps)
        resumed, scale = resume_point(runner.scheduler, int(runner.scheduler.timesteps[resume_index]), noise_var)
        where = {"start_timestep": resumed}
    out = []
    for start in range(0, len(labels), batch_size):
        latents = torch.from_numpy(states[start:start + batch_size] * np.float32(scale) if scale != 1.0
                                   else states[start:start + batch_size])
        out.append(runner(labels[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          output_type="uint8", latents=latents, **where).images)
    if not out:
        return np.zeros((0, config.image_size, config.image_size, config.channels), np.uint8)
    return np.concatenate(out)


def complete_sketch(config, pipe, sketches: np.ndarray, labels, *, steps: int = 20, guidance: float = 2.0,
                    seed: int = 0, resume_index: int, batch_size: int = 256, first_index: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, C] from uint8 sketches [N, H/r, W/r, C]: each upsampled
    (bilinear), noised to the timestep at `resume_index` of the `steps` DDIM grid with noise
    from the request's seed, then denoised over the rest of the grid with its class label.
    first_index: the index of the first sketch in its request (its batch's noise stream)."""
    import torch
    import torch.nn.functional as F

    _check_split(config, steps, resume_index)
    labels = pipe.check_class_labels(labels)
    sketches = np.asarray(sketches)
    if sketches.dtype != np.uint8 or sketches.ndim != 4 or len(sketches) != len(labels) \
            or sketches.shape[3] != config.channels or config.image_size % sketches.shape[1] \
            or sketches.shape[1] != sketches.shape[2]:
        raise ValueError(f"sketches of {sketches.dtype} {sketches.shape} do not fit {len(labels)} images of "
                         f"{config.image_size}x{config.image_size}x{config.channels}")
    runner = _runner(config, pipe, SPLIT_SAMPLER)
    runner.scheduler.set_timesteps(steps)
    alpha = runner.scheduler.alphas_cumprod[int(runner.scheduler.timesteps[resume_index])]
    out = []
    for start in range(0, len(labels), batch_size):
        small = torch.from_numpy(np.array(sketches[start:start + batch_size])).permute(0, 3, 1, 2)
        x0 = F.interpolate(small.float() / 127.5 - 1.0, size=(config.image_size, config.image_size),
                           mode="bilinear", align_corners=False)
        noise = torch.randn(x0.shape, generator=_stream_generator(seed, first_index + start, SKETCH_NOISE_STREAM))
        latents = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        out.append(runner(labels[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          output_type="uint8", latents=latents, start_index=resume_index).images)
    if not out:
        return np.zeros((0, config.image_size, config.image_size, config.channels), np.uint8)
    return np.concatenate(out)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, H/r, W/r, C], each pixel the rounded mean of its r x r
    block (the server's half of a sketch hand-off)."""
    n, h, w, c = images.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"a sketch factor must divide the {h}x{w} image, got {factor}")
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float64)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)
