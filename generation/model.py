"""The generator: diffusers' UNet2DModel conditioned on the class, with one extra "null"
class (index C) for classifier-free guidance, plus checkpoint I/O that refuses a corrupted
or mismatched checkpoint with a reason.

A checkpoint directory holds `config.json` (architecture, classes, provenance) and
`model.safetensors` (the EMA weights, which sample better than the raw ones).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "digits"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


@dataclass(frozen=True)
class GeneratorConfig:
    image_size: int
    channels: int
    num_classes: int
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    train_timesteps: int = 1000
    class_names: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)  # the command, seed and steps that made it

    @property
    def null_class(self) -> int:
        return self.num_classes


def build_unet(config: GeneratorConfig):
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.channels, out_channels=config.channels,
        layers_per_block=config.layers_per_block, block_out_channels=tuple(config.block_out_channels),
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        num_class_embeds=config.num_classes + 1, norm_num_groups=8,
    )


def save_checkpoint(directory: str | Path, config: GeneratorConfig, state_dict: dict) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(directory / "model.safetensors.tmp"))
    (directory / "model.safetensors.tmp").replace(directory / "model.safetensors")  # never a half-written file
    (directory / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")


def load_config(directory: str | Path) -> GeneratorConfig:
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
        data["block_out_channels"] = tuple(data["block_out_channels"])
        data["class_names"] = tuple(data.get("class_names", ()))
        return GeneratorConfig(**data)
    except FileNotFoundError:
        raise CheckpointError(f"no generator checkpoint at {directory} (config.json missing)") from None
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} is not a generator config: {err}") from None


def load_generator(directory: str | Path = DEFAULT_CHECKPOINT):
    """(config, UNet in eval mode) from a checkpoint directory, or CheckpointError saying why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = load_config(directory)
    weights = Path(directory) / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{weights} is missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupted: {err}") from None
    unet = build_unet(config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)[:200]]
        raise CheckpointError(f"{weights} does not match its config.json: {first[0].strip()}") from None
    return config, unet.eval()
