"""The generator's configuration and the layout of its checkpoint directory.

A checkpoint is a diffusers pipeline directory, so diffusers alone can load it
(`ClassConditionalPipeline.from_pretrained(DIR)`), plus one file of ours:

    model_index.json                              the pipeline: a unet and a scheduler
    unet/config.json                              the architecture
    unet/diffusion_pytorch_model.safetensors      the EMA weights (they sample better than the raw ones)
    scheduler/scheduler_config.json               DDIM without clipping, on the training noise schedule
    generator.json                                class names, the null class, provenance

A GAN's directory (the GAN baseline, generation/gan.py) holds model_index.json (GanPipeline),
generator/config.json and generator/diffusion_pytorch_model.safetensors, and generator.json.
generation/checkpoint.py writes and reads both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# What ships for each embedded dataset (fedfill.data.EMBEDDED), trained on its public split:
# the diffusion model a run's service samples, FIMI's GAN baseline, and the start of the ddpm
# job's fine-tuning (trained on classes 0-4 only). Made and measured as each one's README says.
SHIPPED_ROLES = {"diffusion": "", "gan": "-gan", "start": "-0to4"}  # role -> directory suffix
SHIPPED_DATASETS = ("digits", "mnist5k")
DEFAULT_CHECKPOINT = CHECKPOINTS / "digits"
GAN_CHECKPOINT = CHECKPOINTS / "digits-gan"  # FIMI's GAN baseline, same public split
GENERATOR_JSON = "generator.json"
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
UNET_CONFIG = Path("unet") / "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
LEGACY_FILES = ("config.json", "model.safetensors")  # the layout before diffusers' own I/O
MODELS = ("ddpm", "gan")
# model_index.json's components of each kind of checkpoint
COMPONENTS = {"ddpm": ("unet", "scheduler"), "gan": ("generator",)}
GAN_INDEX = ("GanPipeline", ["generation.gan", "GanGenerator"])  # what save_gan_checkpoint writes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


def shipped_checkpoint(dataset: str, role: str = "diffusion") -> Path:
    """The generator fedfill ships for `dataset` in `role` (SHIPPED_ROLES), or CheckpointError
    saying how to make one: a run, a campaign, `generator sample` and the ddpm job all take
    their default generator from here."""
    from fedfill.data import embedded

    name = embedded(dataset)
    path = CHECKPOINTS / f"{name}{SHIPPED_ROLES[role]}" if name in SHIPPED_DATASETS else None
    if path is None or not (path / "model_index.json").is_file():
        what = {"diffusion": "generator", "gan": "GAN baseline", "start": "starting generator (classes 0-4)"}[role]
        raise CheckpointError(f"fedfill ships no {what} for {dataset}: train one with `fedfill generator train "
                              f"--dataset {dataset}" + ("" if name else " --data-dir DIR") + {"diffusion": "", "gan": " --model gan",
                                                        "start": " --classes 0-4"}[role] + " --out DIR`")
    return path


@dataclass(frozen=True)
class GeneratorConfig:
    """The whole generator in one place. On disk the architecture lives in unet/config.json
    and the noise schedule in scheduler/scheduler_config.json (diffusers' files); only
    class_names and provenance go to generator.json. model: "ddpm", or "gan" for the GAN
    baseline, whose block_out_channels are its generator's widths (the DDPM-only fields keep
    their defaults: train_timesteps bounds the steps a request may ask of either kind)."""

    image_size: int
    channels: int
    num_classes: int
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    train_timesteps: int = 1000
    class_names: tuple[str, ...] = ()
    # the command, seed and steps that made it, and the dataset (name, data dir, split seed) it learned
    provenance: dict = field(default_factory=dict)
    model: str = "ddpm"

    @property
    def null_class(self) -> int:
        return self.num_classes


def build_unet(config: GeneratorConfig):
    """The class-conditional UNet this config describes, with random weights."""
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    if not levels or config.image_size % 2 ** (levels - 1) or any(w % 8 for w in config.block_out_channels):
        # diffusers would fail mid-step: an odd map upsampled comes back one pixel larger (28: 7 -> 4 -> 8)
        raise ValueError(f"block_out_channels {list(config.block_out_channels)}: the UNet halves the image "
                         f"{levels - 1} times, which must divide its {config.image_size} pixels, and each width "
                         "must be a multiple of 8 (its group norm's groups)")
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.channels, out_channels=config.channels,
        layers_per_block=config.layers_per_block, block_out_channels=tuple(config.block_out_channels),
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        num_class_embeds=config.num_classes + 1, norm_num_groups=8,
    )
