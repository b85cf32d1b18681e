"""LoRA adapters on the generator's UNet, for federated fine-tuning that trains and uploads
only the adapters (`--trainable lora`).

    add_lora(unet, rank)            inject the adapters (peft), base frozen; the model is unchanged
                                    until training moves them (LoRA's B starts at zero)
    trainable_names(unet)           what goes on the wire, in its order ...
    trainable_arrays(unet)          ... as float32 arrays
    set_trainable_arrays(unet, a)   load them back (shape-checked)
    merged_unet(unet)               a plain UNet2DModel with the adapters merged in, for
                                    save_pretrained / save_checkpoint and for sampling without peft

Adapted layers (TARGET_MODULES), all inside the attention and ResNet blocks:
- attention: to_q, to_k, to_v, to_out.0 (the projections; diffusers' and peft's usual choice);
- ResNet blocks: conv1 and conv2 (the block's two 3x3 convolutions), conv_shortcut (the 1x1
  convolution on the residual path where the channel count changes: in the up blocks it
  carries the U-Net's skip connections) and time_emb_proj (the Linear through which the
  timestep and, in UNet2DModel, the class embedding added to it enter each block: the
  per-block path of the class conditioning that a device's class mix asks to fine-tune).
Left frozen and unadapted: conv_in/conv_out (one image channel: a rank above 1 buys nothing
on conv_in), the up/downsampler convolutions (resampling only), the time and class
embeddings and the norms.

Trainable parameters on the shipped digits UNet (1,003,137 parameters):
rank 1: 20,640 (2.1%), rank 4: 82,560 (8.2%), rank 8: 165,120 (16.5%). Most of it is the
3x3 convolutions: a conv adapter's A is rank x in_channels x 3 x 3, so with 32-64 channels a
rank r costs about r/channels of the convolution (attention: 3,072 per rank unit; conv1 and
conv2: 14,464; conv_shortcut: 960; time_emb_proj: 2,144).

Wire order: the UNet's own parameter order (`unet.named_parameters()`, that of its
state_dict) restricted to the adapter tensors, each adapted layer's lora_A then its lora_B.
The names are peft's adapter state-dict keys (those of `peft.get_peft_model_state_dict`,
without the adapter name), e.g. "mid_block.attentions.0.to_q.lora_A.weight". Two ends that
build the same architecture and call add_lora with the same rank agree on names, order and
shapes; compare trainable_names to check.

peft is an optional dependency (the `lora` extra), imported only when these functions run.
diffusers' own `add_adapter` (its PeftAdapterMixin) is not offered by UNet2DModel, so the
adapters go in with peft's `inject_adapter_in_model`, which is what `add_adapter` calls.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

ADAPTER = "fedfill"  # the adapter's name inside the model (peft's ModuleDict key)
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RESNET_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
TARGET_MODULES = ATTENTION_TARGETS + RESNET_TARGETS
_INNER = f".{ADAPTER}."  # "x.lora_A.fedfill.weight" -> "x.lora_A.weight"


def add_lora(unet, rank: int, alpha: float | None = None, seed: int = 0):
    """Inject LoRA adapters of `rank` (scaling alpha / rank, alpha defaulting to rank) into
    TARGET_MODULES of `unet`, in place; returns `unet`. Only the adapter tensors require
    grad afterwards. A is drawn from torch's generator seeded with `seed` (the global
    generator is left as it was), B is zero, so the adapted model computes what the base
    does until it is trained."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    LoraConfig, inject_adapter_in_model, _ = _peft()
    if _lora_layers(unet):
        raise ValueError("the UNet already has LoRA adapters")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(TARGET_MODULES), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU, before moving it to the base's device
        torch.manual_seed(seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    adapters = {id(p) for _, p in _adapter_parameters(unet)}
    for parameter in unet.parameters():
        parameter.requires_grad_(id(parameter) in adapters)
    return unet


def trainable_names(unet) -> list[str]:
    """The adapter tensors' names, in wire order (see the module's docstring)."""
    return [name for name, _ in _adapter_parameters(unet)]


def trainable_arrays(unet) -> list[np.ndarray]:
    """The adapter tensors as float32 arrays (copies), in trainable_names order."""
    return [p.detach().to(device="cpu", dtype=torch.float32).numpy().copy() for _, p in _adapter_parameters(unet)]


def set_trainable_arrays(unet, arrays) -> None:
    """Load adapter tensors given in trainable_names order. Every count and shape is checked
    before any tensor is written: a mismatch is a ValueError naming the tensor."""
    named = _adapter_parameters(unet)
    arrays = list(arrays)
    if len(arrays) != len(named):
        raise ValueError(f"expected {len(named)} LoRA arrays, got {len(arrays)}")
    arrays = [np.asarray(a) for a in arrays]
    for (name, parameter), array in zip(named, arrays):
        if tuple(array.shape) != tuple(parameter.shape):
            raise ValueError(f"LoRA tensor {name} has shape {tuple(parameter.shape)}, got {tuple(array.shape)}")
    with torch.no_grad():
        for (_, parameter), array in zip(named, arrays):
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


def merged_unet(unet):
    """A new plain UNet2DModel (no peft modules) with W + scale * B A in every adapted layer,
    on the adapted model's device and dtype and in its train/eval mode. The adapted model is
    left as it is."""
    from diffusers import UNet2DModel

    layers = _lora_layers(unet)
    if not layers:
        raise ValueError("the UNet has no LoRA adapters: call add_lora first")
    with torch.no_grad():
        state = dict(unet.state_dict())
        for name, layer in layers.items():
            prefix = name + "."
            for key in [k for k in state if k.startswith(prefix)]:
                tensor = state.pop(key)  # the adapter's own tensors are dropped
                if key.startswith(prefix + "base_layer."):
                    state[prefix + key[len(prefix + "base_layer."):]] = tensor
            weight = state[prefix + "weight"]
            state[prefix + "weight"] = weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)
        with torch.random.fork_rng(devices=[]):  # the throwaway initial weights draw no caller's numbers
            plain = UNet2DModel.from_config(unet.config)
        plain.load_state_dict(state, strict=True)  # copies: nothing shared with the adapted model
    if plain.dtype != unet.dtype:
        plain.to(dtype=unet.dtype)
    if plain.device != unet.device:
        plain.to(device=unet.device)
    plain.train(unet.training)
    return plain


def _peft():
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ImportError(f"LoRA fine-tuning needs peft, which cannot be imported ({err}): "
                          "pip install 'fedfill[lora]'") from err
    return LoraConfig, inject_adapter_in_model, LoraLayer


def _lora_layers(unet) -> dict:
    """Adapted module name -> peft LoRA layer holding our adapter."""
    _, _, LoraLayer = _peft()
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}


def _adapter_parameters(unet) -> list[tuple[str, torch.nn.Parameter]]:
    """(wire name, parameter) of every adapter tensor, in the UNet's parameter order."""
    named = [(name.replace(_INNER, "."), parameter) for name, parameter in unet.named_parameters()
             if (".lora_A" + _INNER in name or ".lora_B" + _INNER in name)]
    if not named:
        raise ValueError("the UNet has no LoRA adapters: call add_lora first")
    return named
