"""The GAN baseline of [FIMI §V-B]: a class-conditional GAN generator trained on the same public
split as the diffusion model, saved as a diffusers pipeline directory and served by the same
service (`load_generator` tells the two kinds apart by model_index.json).

    model_index.json                                   the pipeline: GanPipeline with one generator
    generator/config.json                              the architecture (GanGenerator's config)
    generator/diffusion_pytorch_model.safetensors      the EMA weights of the generator
    generator.json                                     class names, provenance ("model": "gan")

The generator is DCGAN-shaped: a latent concatenated with a class embedding, projected to a
small feature map, then nearest-neighbour upsampling + 3x3 convolutions (no checkerboard
artefacts, unlike transposed convolutions) up to the image, tanh into [-1, 1], the DDPM's
model space. It normalises with PixelNorm (ProGAN) rather than BatchNorm: no running
statistics, so an EMA of the weights is the whole model and an image never depends on the
rest of its batch. The discriminator (training only) has spectral normalisation and a
projection head for the class (Miyato & Koyama 2018); the loss is the hinge loss. That is
SNGAN's recipe, which trains stably without tuning.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .pipeline import ClassConditionalMixin

GAN_COMPONENT = "generator"  # the pipeline's one component, and its subfolder
GAN_LATENT_DIM = 32


def default_widths(image_size: int) -> tuple[int, ...]:
    """Channel widths per resolution, from the smallest feature map (4x4 or the first odd
    size) up to the image: (128, 64) for 8x8 digits, (256, 256, 128, 64) for 32x32."""
    upsamplings, size = 0, image_size
    while size > 4 and size % 2 == 0:
        size //= 2
        upsamplings += 1
    return tuple(min(256, 64 * 2 ** (upsamplings - i)) for i in range(upsamplings + 1))


class PixelNorm(nn.Module):
    """Each pixel's feature vector scaled to unit mean square (ProGAN): no batch statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class GanGenerator(ModelMixin, ConfigMixin):
    """(latents [N, latent_dim], class labels [N]) -> images [N, channels, H, W] in [-1, 1].

    widths: channels at each resolution, the first at image_size / 2^(len(widths) - 1), each
    next one twice as large; default_widths(image_size) when None.
    """

    @register_to_config
    def __init__(self, image_size: int = 8, channels: int = 1, num_classes: int = 10,
                 latent_dim: int = GAN_LATENT_DIM, widths: tuple[int, ...] | None = None):
        super().__init__()
        widths = tuple(widths) if widths is not None else default_widths(image_size)
        figures = {"image_size": image_size, "channels": channels, "num_classes": num_classes,
                   "latent_dim": latent_dim}
        wrong = {k: v for k, v in figures.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if wrong or not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(f"a GAN generator needs positive integers, got {wrong or {'widths': list(widths)}}")
        scale = 2 ** (len(widths) - 1)
        if image_size % scale:
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(widths) - 1} "
                             f"({len(widths)} widths: one resolution each, doubling)")
        self.register_to_config(widths=widths)  # the widths used, also where the default was taken
        self.base_size = image_size // scale
        self.class_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(2 * latent_dim, widths[0] * self.base_size ** 2)
        layers: list[nn.Module] = [PixelNorm(), nn.LeakyReLU(0.2)]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width_in, width_out, 3, padding=1),
                       PixelNorm(), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-1], channels, 3, padding=1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        features = self.project(torch.cat([latents, self.class_embedding(class_labels)], dim=1))
        width = self.project.out_features // self.base_size ** 2
        return self.layers(features.view(len(latents), width, self.base_size, self.base_size))


class ProjectionDiscriminator(nn.Module):
    """Real/fake score of (images, labels): a spectrally normalised convnet mirroring the
    generator, features summed over space, plus the projection <embed(y), features>. Used in
    training only; it is never saved in the checkpoint."""

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...]):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [sn(nn.Conv2d(width_in, width_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
                       sn(nn.Conv2d(width_out, width_out, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.layers = nn.Sequential(*layers)
        self.score = sn(nn.Linear(widths[-1], 1))
        self.class_embedding = sn(nn.Embedding(num_classes, widths[-1]))

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        features = self.layers(images).sum(dim=(2, 3))
        return self.score(features).squeeze(1) + (self.class_embedding(class_labels) * features).sum(dim=1)


class GanPipeline(ClassConditionalMixin, DiffusionPipeline):
    """Class-conditional generation with a GAN: one forward pass of `generator` per batch.

    Its call takes the arguments of ClassConditionalPipeline's, so the service and sample()
    call either kind alike; num_inference_steps and guidance_scale are accepted and IGNORED
    (a GAN has no sampling steps and no guidance).
    """

    model_cpu_offload_seq = GAN_COMPONENT

    def __init__(self, generator: GanGenerator):
        super().__init__()
        self.register_modules(generator=generator)

    @property
    def num_classes(self) -> int:
        return int(self.generator.config.num_classes)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 20, guidance_scale: float = 2.0,
                 generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True):
        """One image per label, all in one batch; output_type "np", "pil" or "uint8" as in
        ClassConditionalPipeline. `generator` is the torch.Generator (diffusers' name), not the
        model: the latents are its only draw, so a seeded one gives the same images."""
        labels = self.labels_tensor(class_labels, output_type)
        model = self.components[GAN_COMPONENT]
        latents = randn_tensor((len(labels), model.config.latent_dim), generator=generator, device=self.device,
                               dtype=model.dtype)
        images = model(latents, labels)
        self.maybe_free_model_hooks()
        return self.images_output(images, output_type, return_dict)
