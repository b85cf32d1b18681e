"""Sampling many images: the checkpoint's pipeline (which holds the maths) over batches. For a
diffusion model the sampler is picked by name (DDIM, DPM-Solver++ or 1000-step DDPM); a GAN
has one forward pass and ignores steps, guidance and sampler.

Determinism rule, which the service's cache relies on: one torch.Generator per batch of
`batch_size`, seeded seed * 1_000_003 + the batch's first index, so the same seed and request
give the same images, and a batch's images do not depend on how many came before it in the
same process.
"""

from __future__ import annotations

import numpy as np

from .pipeline import SAMPLERS, ClassConditionalPipeline, make_scheduler

__all__ = ["SAMPLERS", "make_scheduler", "sample"]


def sample(config, pipe, labels, *, steps: int = 20, guidance: float = 2.0, seed: int = 0, sampler: str = "ddim",
           batch_size: int = 256) -> np.ndarray:
    """uint8 images [N, H, W, C] of the given class labels (config and pipe from load_generator)."""
    import torch

    labels = pipe.check_class_labels(labels)
    if config.model == "gan":
        runner = pipe
    else:
        # A pipeline of our own with the sampler swapped in, diffusers style; the caller's keeps its scheduler.
        scheduler = make_scheduler(sampler, pipe.scheduler.config)
        runner = ClassConditionalPipeline(**{**pipe.components, "scheduler": scheduler})
        runner.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(labels), batch_size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        out.append(runner(labels[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generator, output_type="uint8").images)
    if not out:
        return np.zeros((0, config.image_size, config.image_size, config.channels), np.uint8)
    return np.concatenate(out)
