"""A generator's checkpoint written and read: the diffusion model (diffusers' UNet2DModel
conditioned on the class, with one extra "null" class for classifier-free guidance) or the
GAN baseline, each a pipeline directory (the layout: generation/config.py).
`load_generator` tells the kinds apart by the components model_index.json names (a unet and
a scheduler, or a generator).

`load_generator` adds what diffusers leaves out: it refuses weights that miss or add keys
(diffusers only warns and leaves random weights), never reads a pickle, never goes to the
hub, and turns every failure into a CheckpointError with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import (COMPONENTS, DEFAULT_CHECKPOINT, GAN_INDEX, GENERATOR_JSON, LEGACY_FILES, SCHEDULER_CONFIG,
                     UNET_CONFIG, WEIGHTS, CheckpointError, GeneratorConfig)


def save_checkpoint(directory: str | Path, config: GeneratorConfig, unet, noise_schedule: dict | None = None) -> None:
    """Write `unet` (holding the weights to ship) as a pipeline directory with the stored
    sampler on `noise_schedule` (the training scheduler's config; default: linear betas over
    config.train_timesteps). Files are written aside and moved in whole: a crash leaves old
    or new files, never a half-written one."""
    from .pipeline import ClassConditionalPipeline, make_scheduler

    scheduler = make_scheduler("ddim", noise_schedule or {"num_train_timesteps": config.train_timesteps})
    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler)
    meta = {"class_names": list(config.class_names), "null_class": config.null_class, "provenance": config.provenance}
    save_pipeline(directory, pipe, {GENERATOR_JSON: meta})


def save_gan_checkpoint(directory: str | Path, config: GeneratorConfig, model) -> None:
    """`model` (a GanGenerator holding the weights to ship) as a GanPipeline directory plus
    generator.json, written as save_checkpoint writes a DDPM's."""
    from .gan import GanPipeline

    meta = {"class_names": list(config.class_names), "provenance": config.provenance}
    save_pipeline(directory, GanPipeline(generator=model), {GENERATOR_JSON: meta})


def save_pipeline(directory: str | Path, pipe, json_files: dict[str, dict]) -> None:
    """diffusers' save_pretrained of `pipe` plus our JSON files (name: content), written aside
    and moved in whole, file by file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, content in json_files.items():
            (Path(tmp) / name).write_text(json.dumps(content, indent=1) + "\n")
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            target = directory / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


def load_generator(directory: str | Path = DEFAULT_CHECKPOINT):
    """(config, pipeline in eval mode) from a checkpoint directory: a ClassConditionalPipeline
    for a diffusion model, a GanPipeline for a GAN (config.model says which); or
    CheckpointError saying why not."""
    directory = Path(directory)
    _check_layout(directory)
    # Every JSON file diffusers reads is read here first: diffusers would only say "not a valid
    # JSON file", and takes a scheduler config that is not an object for a hub repository id
    # (then retries the network for half a minute, local_files_only notwithstanding).
    kind = _check_pipeline_index(directory / "model_index.json")
    meta = _read_json(directory / GENERATOR_JSON, "generator.json")
    if kind == "gan":
        from .gan import GAN_COMPONENT, GanGenerator, GanPipeline

        pipe = _load_pipeline(directory, GanPipeline, GAN_COMPONENT, GanGenerator, "GAN generator config")
        config = _gan_config_from(directory, pipe, meta)
        model = pipe.components[GAN_COMPONENT]
    else:
        from diffusers import UNet2DModel

        from .pipeline import ClassConditionalPipeline

        unet_config = _read_json(directory / UNET_CONFIG, "UNet config")
        _read_json(directory / SCHEDULER_CONFIG, "scheduler config")
        pipe = _load_pipeline(directory, ClassConditionalPipeline, "unet", UNet2DModel, "UNet config", unet_config)
        config = _config_from(directory, pipe, meta)
        model = pipe.unet
    pipe.set_progress_bar_config(disable=True)  # a service log and a CLI's stderr are no place for bars
    model.eval()
    return config, pipe


def _load_pipeline(directory: Path, pipeline_cls, subfolder: str, model_cls, what: str, model_config=None):
    """`pipeline_cls` with its model component loaded from `subfolder` under the strict checks."""
    config_path, weights = Path(subfolder) / "config.json", directory / subfolder / WEIGHTS.name
    if model_config is None:
        model_config = _read_json(directory / config_path, what)
    _check_sizes(directory / config_path, model_config, _check_weights(weights))
    # A config diffusers does not expect fails anywhere in its code, with any exception
    # (KeyError, IndexError, UnboundLocalError, ...): each is a checkpoint that cannot be used.
    with _diffusers_quiet():
        try:
            model, info = model_cls.from_pretrained(directory, subfolder=subfolder, local_files_only=True,
                                                    use_safetensors=True, low_cpu_mem_usage=False,
                                                    output_loading_info=True)
        except RuntimeError as err:  # shapes in the file differ from those the config builds
            raise CheckpointError(f"{weights} does not match its {config_path}: {second_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - see above
            raise CheckpointError(f"{directory / subfolder} cannot be loaded: {first_line(err)}") from None
        wrong = info["missing_keys"] + info["unexpected_keys"] + [k[0] for k in info["mismatched_keys"]]
        if wrong:
            raise CheckpointError(f"{weights} does not match its {config_path}: {len(wrong)} tensors differ, "
                                  f"first {wrong[0]}")
        try:
            return pipeline_cls.from_pretrained(directory, **{subfolder: model}, local_files_only=True,
                                                low_cpu_mem_usage=False)
        except Exception as err:  # noqa: BLE001 - see above
            raise CheckpointError(f"{directory} is not a loadable pipeline: {first_line(err)}") from None


def parameter_count(directory: str | Path) -> int:
    """The parameters of a checkpoint's network, from its safetensors headers (no model built,
    no torch): what the cost model counts a generator's sampling by."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).rglob("*.safetensors")):
        with safe_open(str(path), "np") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(np.prod(shape, dtype=np.int64)) if shape else 1
    return total


def weights_bytes(directory: str | Path) -> int:
    """What fetching a checkpoint's weights costs: its safetensors files' bytes."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*.safetensors"))


def weights_digest(pipe) -> str:
    """sha256 of what decides the images: the model's tensors as loaded (not the file, which
    training may overwrite while a service runs) and, for a diffusion model, the stored noise
    schedule."""
    import torch

    from .pipeline import NOISE_SCHEDULE

    components = pipe.components
    model = components["unet"] if "unet" in components else components["generator"]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if "scheduler" in components:
        schedule = {k: pipe.scheduler.config.get(k) for k in NOISE_SCHEDULE}
        digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    else:
        digest.update(json.dumps({"model": "gan", "image_size": model.config.image_size}).encode())
    return digest.hexdigest()


def _check_layout(directory: Path) -> None:
    if (directory / "model_index.json").is_file():
        return
    if any((directory / name).is_file() for name in LEGACY_FILES):
        raise CheckpointError(f"{directory} holds a checkpoint in the old layout (config.json + model.safetensors); "
                              f"convert it: fedfill generator convert --from {directory} --to NEW_DIR")
    raise CheckpointError(f"no generator checkpoint at {directory} (model_index.json missing)")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as err:  # a directory in its place, unreadable, ...
        raise CheckpointError(f"{path} cannot be read: {err.strerror or err}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a valid {what}: nested too deeply") from None
    except ValueError as err:  # JSON's errors, undecodable bytes, an integer of more digits than Python reads
        raise CheckpointError(f"{path} is not a valid {what}: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a valid {what}: not a JSON object")
    return data


def _check_pipeline_index(path: Path) -> str:
    """model_index.json names the pipeline's class and a [library, class] pair per component;
    returns the kind of generator: "gan" where it names a generator and no unet."""
    index = _read_json(path, "pipeline index")
    if not isinstance(index.get("_class_name"), str):
        raise CheckpointError(f"{path} is not a valid pipeline index: no pipeline class name")
    kind = "gan" if "generator" in index and "unet" not in index else "ddpm"
    for component in COMPONENTS[kind]:
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise CheckpointError(f"{path} is not a valid pipeline index: '{component}' must be a "
                                  f"[library, class] pair, got {str(entry)[:80]}")
    # Only one GAN exists: a file naming another module would have diffusers import it.
    if kind == "gan" and (index["_class_name"], index["generator"]) != GAN_INDEX:
        raise CheckpointError(f"{path} names {index['_class_name'][:40]} with generator "
                              f"{str(index['generator'])[:80]}; a GAN checkpoint of ours is {GAN_INDEX[0]} with "
                              f"{list(GAN_INDEX[1])}")
    return kind


def _check_weights(path: Path) -> int:
    """Open the safetensors header: says "missing" or "corrupted" where diffusers would fall
    back to a pickle or lose the reason. Returns the largest of the tensor count and the
    tensors' dimensions."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), "pt") as handle:
            names = list(handle.keys())
            dims = [d for name in names for d in handle.get_slice(name).get_shape()]
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupted: {first_line(err)}") from None
    return max([len(names), *dims])


MAX_SAMPLE_SIZE = 2**14  # pixels a side: far beyond any generator here, and bounded


def _check_sizes(path: Path, config: dict, largest: int) -> None:
    """No integer of the model's config (a layer count, a width, a class count) exceeds both the
    weights' largest dimension and their tensor count: diffusers builds the model before the
    weights are compared with it, and a layers_per_block of 10**400 built layers until memory
    ran out. The image size is not a tensor dimension; it is held below MAX_SAMPLE_SIZE."""
    for key, value in config.items():
        items = value if isinstance(value, list) else [value]
        bound = MAX_SAMPLE_SIZE if key in ("sample_size", "image_size") else largest
        if any(isinstance(v, int) and not isinstance(v, bool) and v > bound for v in items):
            raise CheckpointError(f"{path}: '{key}' is {str(value)[:40]}, beyond what the weights (largest "
                                  f"dimension or tensor count {largest}) can describe")


def _config_from(directory: Path, pipe, meta: dict) -> GeneratorConfig:
    unet = pipe.unet.config
    sample_size = unet.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0] if sample_size else None
    figures = {"sample_size": sample_size, "in_channels": unet.in_channels, "layers_per_block": unet.layers_per_block,
               "num_class_embeds": unet.num_class_embeds or 0,
               "num_train_timesteps": pipe.scheduler.config.num_train_timesteps}
    # diffusers builds a UNet for some configs no generator of ours has (a sample_size of None)
    wrong = {k: v for k, v in figures.items()
             if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "num_class_embeds" else 1)}
    channels = unet.block_out_channels
    if not isinstance(channels, (list, tuple)) or not all(isinstance(c, int) and c > 0 for c in channels):
        wrong["block_out_channels"] = channels
    if wrong:
        raise CheckpointError(f"{directory} does not describe an image generator: {str(wrong)[:200]}")
    num_classes = figures["num_class_embeds"] - 1
    if num_classes < 1:
        raise CheckpointError(f"{directory / UNET_CONFIG} has no class embedding: not a class-conditional generator")
    names = meta.get("class_names")
    null = meta.get("null_class")
    _check_provenance(directory, meta)
    if not isinstance(names, list) or len(names) != num_classes or null != num_classes:
        raise CheckpointError(f"{directory / GENERATOR_JSON} does not match its {UNET_CONFIG}: the UNet has "
                              f"{num_classes} classes + null class {num_classes}, generator.json lists "
                              f"{len(names) if isinstance(names, list) else 'no'} class names and null class {null}")
    return GeneratorConfig(image_size=sample_size, channels=unet.in_channels, num_classes=num_classes,
                           block_out_channels=tuple(channels), layers_per_block=unet.layers_per_block,
                           train_timesteps=figures["num_train_timesteps"],
                           class_names=tuple(str(n) for n in names), provenance=dict(meta.get("provenance") or {}))


def _gan_config_from(directory: Path, pipe, meta: dict) -> GeneratorConfig:
    """GanGenerator's own constructor has checked its figures (positive integers that fit)."""
    model = pipe.components["generator"].config
    names = meta.get("class_names")
    _check_provenance(directory, meta)
    if not isinstance(names, list) or len(names) != model.num_classes:
        raise CheckpointError(f"{directory / GENERATOR_JSON} does not match its generator/config.json: the "
                              f"generator has {model.num_classes} classes, generator.json lists "
                              f"{len(names) if isinstance(names, list) else 'no'} class names")
    return GeneratorConfig(image_size=model.image_size, channels=model.channels, num_classes=model.num_classes,
                           block_out_channels=tuple(model.widths), class_names=tuple(str(n) for n in names),
                           provenance=dict(meta.get("provenance") or {}), model="gan")


def _check_provenance(directory: Path, meta: dict) -> None:
    if not isinstance(meta.get("provenance") or {}, dict):
        raise CheckpointError(f"{directory / GENERATOR_JSON}: 'provenance' must be an object")


@contextmanager
def _diffusers_quiet():
    """diffusers' warnings and loading bar would repeat, less clearly, what CheckpointError says."""
    from diffusers.utils import logging as diffusers_logging

    level, bar = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        if bar:
            diffusers_logging.enable_progress_bar()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines() or [type(err).__name__])[0].strip()[:300]


def second_line(err: BaseException) -> str:
    """torch's load_state_dict error: a header line, then one line per tensor."""
    lines = str(err).strip().splitlines()
    return (lines[1:2] or lines[:1] or [type(err).__name__])[0].strip()[:300]
