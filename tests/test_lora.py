"""LoRA adapters on the generator's UNet (generation/lora.py): they start as a no-op, training
moves only them, they travel as float32 arrays, and merged into a plain UNet2DModel they
compute what the adapted model computes and save and load the diffusers way."""

import copy
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install 'fedfill[lora]'")

from generation.lora import (TARGET_MODULES, add_lora, merged_unet, set_trainable_arrays,  # noqa: E402
                             trainable_arrays, trainable_names)
from generation.checkpoint import load_generator, save_checkpoint
from generation.config import DEFAULT_CHECKPOINT  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return load_generator(DEFAULT_CHECKPOINT)


@pytest.fixture
def base(shipped):
    return copy.deepcopy(shipped[1].unet)


def batch(seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (size,), generator=g)
    labels = torch.randint(0, 11, (size,), generator=g)  # the null class (10) included
    return x, t, labels


def predict(unet, x, t, labels):
    with torch.no_grad():
        return unet(x, t, class_labels=labels).sample


def base_state(unet):
    """The base weights under their plain names, whether or not adapters were injected."""
    return {k.replace(".base_layer.", "."): v.clone() for k, v in unet.state_dict().items() if ".lora_" not in k}


def test_the_adapted_model_starts_as_the_base(base):
    x, t, labels = batch()
    expected = predict(base, x, t, labels)
    before = base_state(base)
    adapted = add_lora(base, rank=4)
    assert adapted is base
    assert torch.equal(predict(adapted, x, t, labels), expected)  # B = 0: exactly the base
    names = trainable_names(adapted)
    assert all(not a.any() for n, a in zip(names, trainable_arrays(adapted)) if ".lora_B." in n)
    assert all(a.any() for n, a in zip(names, trainable_arrays(adapted)) if ".lora_A." in n)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names) and all(".lora_" in n for n in trainable)
    after = base_state(adapted)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("rank, count", [(1, 20_640), (4, 82_560), (8, 165_120)])
def test_adapters_sit_on_attention_projections_and_resnet_layers(base, rank, count):
    """The counts the module's docstring reports, against the UNet's 1,003,137 parameters."""
    from peft import get_peft_model_state_dict

    from generation.lora import ADAPTER

    total = sum(p.numel() for p in base.parameters())
    add_lora(base, rank)
    names, arrays = trainable_names(base), trainable_arrays(base)
    assert total == 1_003_137 and sum(a.size for a in arrays) == count
    assert all(a.dtype == np.float32 for a in arrays)
    layers = {n.rsplit(".lora_", 1)[0] for n in names}
    assert len(names) == 2 * len(layers) == 2 * (6 * 4 + 12 * 3 + 7)  # 6 attentions, 12 ResNets, 7 shortcuts
    assert all((".attentions." in n or ".resnets." in n) and n.endswith(TARGET_MODULES) for n in layers)
    assert {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in layers} == set(TARGET_MODULES)
    assert names == list(get_peft_model_state_dict(base, adapter_name=ADAPTER))  # peft's own adapter keys


def test_training_moves_only_the_adapters(base):
    from diffusers import DDPMScheduler

    add_lora(base, rank=4)
    before_base, before_adapters = base_state(base), trainable_arrays(base)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.Adam([p for p in base.parameters() if p.requires_grad], lr=1e-3)
    base.train()
    for step in range(2):
        x0, t, labels = batch(seed=step)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + step))
        loss = torch.nn.functional.mse_loss(base(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after_base = base_state(base)
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)
    assert all(not np.array_equal(a, b) for a, b in zip(trainable_arrays(base), before_adapters))  # A and B both moved


def test_trainable_arrays_round_trip_and_carry_the_model(shipped):
    device, server = (add_lora(copy.deepcopy(shipped[1].unet), 4, seed=s) for s in (1, 2))
    rng = np.random.default_rng(0)
    sent = [rng.normal(0, 0.05, a.shape).astype(np.float64) for a in trainable_arrays(device)]  # any float dtype
    set_trainable_arrays(device, sent)
    received = trainable_arrays(device)
    assert all(r.dtype == np.float32 and np.array_equal(r, s.astype(np.float32)) for r, s in zip(received, sent))
    set_trainable_arrays(server, received)
    assert trainable_names(server) == trainable_names(device)
    x, t, labels = batch()
    assert torch.equal(predict(server, x, t, labels), predict(device, x, t, labels))


def test_the_merged_unet_is_a_plain_unet_that_computes_the_same(shipped, base, tmp_path):
    from diffusers import UNet2DModel

    plain_keys = set(base.state_dict())
    add_lora(base, rank=8, alpha=4.0)
    rng = np.random.default_rng(1)
    set_trainable_arrays(base, [rng.normal(0, 0.05, a.shape) for a in trainable_arrays(base)])
    base.eval()
    x, t, labels = batch()
    adapted_out = predict(base, x, t, labels)
    adapted_state = {k: v.clone() for k, v in base.state_dict().items()}

    merged = merged_unet(base)
    assert type(merged) is UNet2DModel and not hasattr(merged, "peft_config") and not merged.training
    assert set(merged.state_dict()) == plain_keys
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    merged_out = predict(merged, x, t, labels)
    assert not torch.allclose(adapted_out, predict(shipped[1].unet, x, t, labels))  # B moved
    torch.testing.assert_close(merged_out, adapted_out, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, adapted_state[k]) for k, v in base.state_dict().items())  # adapted model untouched
    assert torch.equal(predict(base, x, t, labels), adapted_out)

    merged.save_pretrained(tmp_path / "unet", safe_serialization=True)
    reloaded, info = UNet2DModel.from_pretrained(tmp_path / "unet", local_files_only=True, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert torch.equal(predict(reloaded.eval(), x, t, labels), merged_out)

    save_checkpoint(tmp_path / "checkpoint", shipped[0], merged)
    _, pipe = load_generator(tmp_path / "checkpoint")  # refuses missing or extra tensors
    assert torch.equal(predict(pipe.unet, x, t, labels), merged_out)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4"])
def test_a_rank_that_is_not_a_positive_integer_is_refused(base, rank):
    with pytest.raises(ValueError, match=r"LoRA rank must be a positive integer, got "):
        add_lora(base, rank)
    assert not any(".lora_" in n for n, _ in base.named_parameters())


def test_the_rank_zero_message(base):
    with pytest.raises(ValueError) as refused:
        add_lora(base, 0)
    assert str(refused.value) == "LoRA rank must be a positive integer, got 0"


def test_a_shape_mismatch_is_refused_naming_the_tensor_and_nothing_is_written(shipped):
    unet = add_lora(copy.deepcopy(shipped[1].unet), 4)
    other = add_lora(copy.deepcopy(shipped[1].unet), 8)
    before = trainable_arrays(unet)
    arrays = [a + 1 for a in before]
    arrays[5] = trainable_arrays(other)[5]
    with pytest.raises(ValueError, match=rf"LoRA tensor {trainable_names(unet)[5]} has shape "):
        set_trainable_arrays(unet, arrays)
    with pytest.raises(ValueError, match=r"expected 134 LoRA arrays, got 133"):
        set_trainable_arrays(unet, before[:-1])
    assert all(np.array_equal(a, b) for a, b in zip(trainable_arrays(unet), before))


def test_a_seed_decides_the_adapters_and_leaves_the_global_generator_alone(shipped):
    state = torch.get_rng_state()
    a, b, c = (trainable_arrays(add_lora(copy.deepcopy(shipped[1].unet), 4, seed=s)) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    merged_unet(add_lora(copy.deepcopy(shipped[1].unet), 1))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_model_without_adapters_is_refused(base):
    with pytest.raises(ValueError, match="no LoRA adapters: call add_lora first"):
        trainable_arrays(base)
    with pytest.raises(ValueError, match="no LoRA adapters: call add_lora first"):
        merged_unet(base)
    add_lora(base, 1)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(base, 1)


def test_without_peft_the_error_names_the_extra(base, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ImportError, match=r"pip install 'fedfill\[lora\]'"):
        add_lora(base, 4)


def test_lora_uploads_the_adapters_but_its_steps_cost_the_whole_unet():
    """The cost model's cycles per sample follow the network a step runs through (the whole
    UNet), its upload the adapters alone."""
    from fedfill.config import RunConfig
    from jobs import load_job
    from server.app import run_system
    from strategies.allocation.presets import PAPER_OMEGA_PER_PARAM

    lora = load_job(RunConfig(job="ddpm", trainable="lora", lora_rank=4))
    full = load_job(RunConfig(job="ddpm"))
    exchanged = sum(w.size for w in lora.initial_weights())
    whole = full.compute_params()
    assert whole == sum(w.size for w in full.initial_weights()), "full fine-tuning: both are the UNet"
    assert lora.compute_params() == whole + exchanged, "the UNet and its adapters run in every step"
    system = run_system(lora.run, exchanged, {0: {"d_loc": 100.0}}, "ondemand", lora.compute_params())
    assert (system.model_params, system.omega) == (exchanged, PAPER_OMEGA_PER_PARAM * (whole + exchanged))
