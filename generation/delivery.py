"""The device's half of a delivery [MEG]: finished images from what the generation service
sent (generation.client.Delivered), with the work it cost the device.

- image: nothing to do.
- state: decode the codec payload, add the experiment's channel noise if any, and run the
  sampler's remaining steps; the hand-off's noise (the codec's exact expected error, plus the
  channel's) is accounted for by resuming where it belongs (generation.sample.complete).
- sketch: upsample, noise to the resume step and denoise with the class label.
- seed: generate the images from the request, as the service would have.

The device completes only with the weights the service used: the reply names their digest,
and a mismatch is refused (DigestMismatch), never turned into wrong images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


class DigestMismatch(ValueError):
    """The service's weights are not the device's: completing would make other images."""


@dataclass
class Finished:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    device_unet_evals: int  # UNet (or GAN generator) passes the device ran
    device_seconds: float  # measured


def finish(delivered, config, pipe, *, steps: int, guidance: float, seed: int, digest: str | None = None,
           naive: bool = False, channel_snr_db: float | None = None) -> Finished:
    """Images from `delivered` (a generation.client.Delivered for the request of `steps`,
    `guidance` and `seed`), completed with this device's `pipe` (config and pipe from
    load_generator; `digest` its weights_digest, computed here when not given).

    naive: resume a state at its hand-off step as if it were exact (the ablation).
    channel_snr_db: experiments only: add white Gaussian noise to a received state at this
    signal-to-noise ratio (per element, against the state's mean square)."""
    from .sample import complete, complete_sketch, sample

    if channel_snr_db is not None and delivered.delivery != "state":
        raise ValueError("a channel's noise is modelled on a state hand-off only")
    if delivered.delivery == "image":
        return Finished(delivered.images, delivered.labels, 0, 0.0)
    if digest is None:
        from .checkpoint import weights_digest

        digest = weights_digest(pipe)
    if delivered.checkpoint_digest != digest:
        raise DigestMismatch(f"the service sampled with weights {delivered.checkpoint_digest[:12]}, this device "
                             f"holds {digest[:12]}: its {delivered.delivery} cannot be completed here")
    started = time.perf_counter()
    if delivered.delivery == "seed":
        images = sample(config, pipe, delivered.labels, steps=steps, guidance=guidance, seed=seed,
                        sampler=delivered.sampler)
        passes = len(delivered.labels) * (1 if config.model == "gan" else 2 * steps)
        return Finished(images, delivered.labels, passes, time.perf_counter() - started)
    out = []
    for batch in delivered.batches:  # the service's batches are the sampler's: their noise streams
        if delivered.delivery == "state":
            states, noise_var = batch.states, batch.noise_var
            if channel_snr_db is not None:
                channel_var = float(np.mean(np.square(states, dtype=np.float64))) * 10 ** (-channel_snr_db / 10)
                rng = np.random.default_rng([seed, batch.first_index, 1])
                states = (states + rng.normal(0.0, np.sqrt(channel_var), states.shape)).astype(np.float32)
                noise_var += channel_var
            out.append(complete(config, pipe, states, batch.labels, steps=steps, guidance=guidance,
                                resume_index=delivered.resume_index, noise_var=noise_var, naive=naive))
        else:
            out.append(complete_sketch(config, pipe, batch.images, batch.labels, steps=steps, guidance=guidance,
                                       seed=seed, resume_index=delivered.resume_index, first_index=batch.first_index))
    images = np.concatenate(out) if out else np.zeros((0, config.image_size, config.image_size, config.channels),
                                                      np.uint8)
    passes = 2 * (steps - delivered.resume_index) * len(delivered.labels)
    return Finished(images, delivered.labels, passes, time.perf_counter() - started)
