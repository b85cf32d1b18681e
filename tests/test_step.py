"""The shared epsilon-prediction step (generation.step).

On the CPU it must train exactly as the plain loop it replaced, draw for draw: the shipped
checkpoints are made by commands whose results must not move. On a GPU (tests skipped
without one) its CUDA graph must train as the eager step does and repeat itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generation.config import GeneratorConfig, build_unet
from generation.step import EpsilonStep, make_generator, make_optimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def tiny_unet(device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    config = GeneratorConfig(image_size=8, channels=1, num_classes=10, block_out_channels=(16, 32),
                             class_names=tuple(map(str, range(10))))
    return config, build_unet(config).to(device)


def batch_data(device: str = "cpu", n: int = 40):
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.uniform(-1, 1, (n, 1, 8, 8)), dtype=torch.float32, device=device)
    y = torch.as_tensor(rng.integers(0, 10, n), dtype=torch.long, device=device)
    return x, y


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def plain_loop(unet, x_all, y_all, null_class: int, steps: int, batch: int, seed: int) -> list[float]:
    """The generator trainer's loop as it was written before EpsilonStep."""
    noise_scheduler = scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (batch,), generator=generator)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=generator) < 0.1] = null_class
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        loss = torch.nn.functional.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t, class_labels=y).sample,
                                            noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def stepped(unet, x_all, y_all, null_class: int, steps: int, batch: int, seed: int, device: str = "cpu",
            cuda_graphs: bool = True):
    generator = make_generator(seed, device)
    step = EpsilonStep(unet, make_optimizer(unet.parameters(), 1e-3, device), scheduler(), generator,
                       null_class=null_class, label_dropout=0.1, cuda_graphs=cuda_graphs)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (batch,), generator=generator, device=generator.device)
        losses.append(step(x_all, y_all, idx))
    return step, [float(v) for v in losses]


def weights(unet) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in unet.parameters()]


def test_on_the_cpu_the_step_trains_bit_for_bit_as_the_plain_loop_did():
    config, reference = tiny_unet()
    _, ours = tiny_unet()
    x, y = batch_data()
    expected = plain_loop(reference, x, y, config.null_class, steps=5, batch=8, seed=3)
    step, losses = stepped(ours, x, y, config.null_class, steps=5, batch=8, seed=3)
    assert not step.use_graph
    assert losses == expected
    for a, b in zip(weights(reference), weights(ours)):
        np.testing.assert_array_equal(a, b)


def test_dropped_labels_become_the_null_class_without_touching_the_data():
    config, unet = tiny_unet()
    x, y = batch_data()
    y_before = y.clone()
    step = EpsilonStep(unet, make_optimizer(unet.parameters(), 1e-3, "cpu"), scheduler(), make_generator(0, "cpu"),
                       null_class=config.null_class, label_dropout=1.0)
    _, dropped, _, _ = step.draw(x, y, torch.arange(10))
    assert dropped.tolist() == [config.null_class] * 10
    step = EpsilonStep(unet, make_optimizer(unet.parameters(), 1e-3, "cpu"), scheduler(), make_generator(0, "cpu"),
                       null_class=config.null_class, label_dropout=0.0)
    _, kept, _, _ = step.draw(x, y, torch.arange(10))
    assert kept.tolist() == y[:10].tolist()
    assert torch.equal(y, y_before)


def test_cpu_optimizer_is_torch_default_adamw():
    _, unet = tiny_unet()
    optimizer = make_optimizer(unet.parameters(), 1e-3, "cpu")
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert group["weight_decay"] == 0.0 and not group["capturable"] and not group["fused"]


@cuda
def test_cuda_graph_step_trains_as_the_eager_step():
    config, eager_unet = tiny_unet("cuda")
    _, graph_unet = tiny_unet("cuda")
    x, y = batch_data("cuda")
    _, eager = stepped(eager_unet, x, y, config.null_class, steps=12, batch=8, seed=3, device="cuda",
                       cuda_graphs=False)
    step, graphed = stepped(graph_unet, x, y, config.null_class, steps=12, batch=8, seed=3, device="cuda")
    assert step.use_graph and step._graph is not None
    np.testing.assert_allclose(graphed, eager, rtol=1e-3, atol=1e-5)
    for a, b in zip(weights(eager_unet), weights(graph_unet)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@cuda
def test_cuda_graph_step_repeats_itself_with_the_same_seed():
    from generation.step import deterministic_cuda

    deterministic_cuda()
    runs = []
    for _ in range(2):
        config, unet = tiny_unet("cuda")
        x, y = batch_data("cuda")
        _, losses = stepped(unet, x, y, config.null_class, steps=10, batch=8, seed=5, device="cuda")
        runs.append((losses, weights(unet)))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)


@cuda
def test_a_captured_step_refuses_another_batch_size():
    config, unet = tiny_unet("cuda")
    x, y = batch_data("cuda")
    generator = make_generator(0, "cuda")
    step = EpsilonStep(unet, make_optimizer(unet.parameters(), 1e-3, "cuda"), scheduler(), generator,
                       null_class=config.null_class, label_dropout=0.1)
    for _ in range(step.warmup + 1):
        step(x, y, torch.arange(8, device="cuda"))
    with pytest.raises(ValueError, match="captured for batches of 8"):
        step(x, y, torch.arange(4, device="cuda"))


def test_eager_gpu_steps_is_a_run_setting_and_a_train_flag(tmp_path, capsys):
    from fedfill.cli import main
    from fedfill.config import RunConfig

    assert RunConfig().eager_gpu_steps is False
    assert RunConfig.from_run_config({"eager-gpu-steps": "true"}).eager_gpu_steps is True
    assert RunConfig.from_run_config(RunConfig(eager_gpu_steps=True).to_run_config()).eager_gpu_steps is True
    # the DDPM trainer takes it (on the CPU it changes nothing); the GAN, which never captures a graph, refuses it
    assert main(["generator", "train", "--eager-gpu-steps", "--out", str(tmp_path / "ddpm"), "--steps", "2",
                 "--batch-size", "8"]) == 0
    assert (tmp_path / "ddpm" / "generator.json").exists()
    capsys.readouterr()
    assert main(["generator", "train", "--model", "gan", "--eager-gpu-steps", "--out", str(tmp_path / "gan"),
                 "--steps", "2"]) == 2
    assert "--eager-gpu-steps is for --model ddpm" in capsys.readouterr().err
    assert not (tmp_path / "gan").exists()


def test_a_failed_capture_steps_eagerly_and_says_so(monkeypatch):
    """Where recording fails, the step warns and takes the same step eagerly; recording ran
    nothing, so the weights are the eager ones. (The failure is made on purpose, the same on
    every machine: CUDAGraph() raises as a capture that cannot record does.)"""

    def cannot_record():
        raise RuntimeError("operation not permitted when stream is capturing")

    config, reference = tiny_unet()
    _, ours = tiny_unet()
    x, y = batch_data()
    _, expected = stepped(reference, x, y, config.null_class, steps=3, batch=8, seed=3)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", cannot_record)  # after the imports, which read it
    generator = make_generator(3, "cpu")
    step = EpsilonStep(ours, make_optimizer(ours.parameters(), 1e-3, "cpu"), scheduler(), generator,
                       null_class=config.null_class, label_dropout=0.1)
    step.use_graph, step.steps_done = True, step.warmup  # as if the warm-up had run on a GPU: next, the capture
    losses = []
    for k in range(3):
        idx = torch.randint(0, len(y), (8,), generator=generator)
        if k == 0:
            with pytest.warns(RuntimeWarning, match="CUDA graph capture of the training step failed"):
                losses.append(float(step(x, y, idx)))
        else:
            losses.append(float(step(x, y, idx)))
    assert not step.use_graph and losses == expected
    for a, b in zip(weights(reference), weights(ours)):
        np.testing.assert_array_equal(a, b)
