"""`fedfill generator convert`: a checkpoint of the old layout (config.json + model.safetensors,
our own I/O before diffusers' save_pretrained) to the pipeline layout, with the very same
weights (checked tensor by tensor after writing; nothing is retrained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import load_generator, save_checkpoint, second_line
from .config import LEGACY_FILES, CheckpointError, GeneratorConfig, build_unet


def read_legacy(directory: str | Path):
    """(config, state dict) of an old-layout checkpoint, or CheckpointError saying why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        if (directory / "model_index.json").is_file():
            raise CheckpointError(f"{directory} is already in the pipeline layout")
        raise CheckpointError(f"no old-layout checkpoint at {directory} (config.json missing)")
    try:
        data = json.loads(path.read_text())
        data["block_out_channels"] = tuple(data["block_out_channels"])
        data["class_names"] = tuple(data.get("class_names", ()))
        config = GeneratorConfig(**data)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} is not a generator config: {err}") from None
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{weights} is missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupted: {err}") from None
    return config, state


def convert_checkpoint(source: str | Path, target: str | Path, *, command: str, dataset: dict) -> GeneratorConfig:
    """Write `source` (old layout) to `target` in the pipeline layout. `dataset` (name, data
    dir, split seed) joins the provenance, which the old layout lacked; `command` is recorded
    as how the checkpoint was converted. source == target converts in place and then removes
    the old files."""
    import torch

    source, target = Path(source), Path(target)
    in_place = source.resolve() == target.resolve()
    if not in_place and (target / "model_index.json").exists():
        raise CheckpointError(f"{target} already holds a checkpoint; choose another --to")
    config, state = read_legacy(source)
    unet = build_unet(config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source / 'model.safetensors'} does not match its config.json: "
                              f"{second_line(err)}") from None
    provenance = {**config.provenance, **dataset, "converted_with": command}
    converted = GeneratorConfig(**{**config.__dict__, "provenance": provenance})
    save_checkpoint(target, converted, unet)
    _, pipe = load_generator(target)
    written = pipe.unet.state_dict()
    if written.keys() != state.keys() or not all(torch.equal(written[k], state[k]) for k in state):
        raise CheckpointError(f"{target}: the written weights differ from {source / 'model.safetensors'}")
    if in_place:
        for name in LEGACY_FILES:
            (source / name).unlink()
    elif (source / "train_log.json").is_file():
        shutil.copy2(source / "train_log.json", target / "train_log.json")
    return converted

