"""One epsilon-prediction training step of the class-conditional UNet, shared by the
generator's trainer (generation.train) and a device's local fine-tuning (jobs.ddpm).

The step: a batch of images and labels, each label replaced by the null class with
probability `label_dropout` (so the network also learns the unconditional score that
classifier-free guidance needs), noise and timesteps drawn, the MSE between the UNet's
prediction and the noise, AdamW.

Why a class rather than a loop body: on a GPU a step of our 1M-weight digits UNet is bound by
kernel launches and Python, not arithmetic (measured on an H100: ~40 ms a step whatever the
batch, 64 or 2048 images). So on CUDA the step's forward, backward and optimizer update are
captured once as a CUDA graph and replayed, which launches them all at once: the optimizer
is AdamW with `capturable` and `fused` (its step count and bias corrections stay on the
GPU), the batch shape is static, and the random draws come from a generator on the GPU, so
nothing in a step waits for the host. The first `warmup` steps run eagerly on a side stream
(CUDA graphs need the lazy initialisations done before capture); they are real steps.
Should the capture fail (a kernel this GPU, driver or torch cannot record), the step says so
once and goes on eagerly: recording runs nothing, so no step is lost or taken twice. A
step on a GPU also asks cuDNN and cuBLAS for their deterministic algorithms (graph or not).

On the CPU the step is the plain eager one, drawing the same numbers in the same order from
a CPU generator as the loops before this class did, so the commands that made the shipped
checkpoints still make them bit for bit. `cuda_graphs=False` gives the eager step on a GPU
as well (the baseline of bench/bench_diffusion.py's speed section; `--eager-gpu-steps` for
users).
"""

from __future__ import annotations

import os
import warnings

WARMUP_STEPS = 3  # eager steps before a capture, as PyTorch's whole-network capture example does


def pick_device() -> str:
    """The GPU when torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_generator(seed: int, device: str):
    """The step's random numbers: a generator on the device the step draws on, so a GPU step
    needs no host-to-device copy of its draws. On the CPU the same generator as ever."""
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def make_optimizer(params, lr: float, device: str):
    """AdamW without weight decay, as the generator was always trained; on CUDA fused and
    capturable (a CUDA graph can hold its update), on the CPU torch's default."""
    import torch

    if str(device).startswith("cuda"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def deterministic_cuda() -> None:
    """Ask cuDNN and cuBLAS for their reproducible algorithms, so that the same seed gives the
    same weights on a given GPU as far as the kernels allow (the nearest-upsampling backward,
    for one, adds with atomics; torch warns about such kernels instead of refusing them)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


class EpsilonStep:
    """`step(x_all, y_all, idx)` trains `unet` on the images x_all[idx] (model space, [-1, 1])
    with labels y_all[idx] and returns the batch's loss as a tensor on the device: reading it
    (float(), .item()) waits for the GPU, so a caller reads losses seldom.

    unet: the network, on its device; optimizer: from make_optimizer over the weights to train
    (all of them, or LoRA's adapters; the trainer resumes its state); noise_scheduler:
    diffusers' DDPMScheduler the model was trained on; generator: from make_generator, on the
    unet's device.
    """

    def __init__(self, unet, optimizer, noise_scheduler, generator, *, null_class: int, label_dropout: float,
                 cuda_graphs: bool = True, warmup: int = WARMUP_STEPS):
        self.unet, self.optimizer, self.noise_scheduler, self.generator = unet, optimizer, noise_scheduler, generator
        self.null_class, self.label_dropout = int(null_class), float(label_dropout)
        self.device = next(unet.parameters()).device
        self.timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.use_graph = bool(cuda_graphs) and self.device.type == "cuda"
        if self.device.type == "cuda":
            deterministic_cuda()  # before the first step: cuBLAS reads its workspace setting when it starts
        self.warmup = max(1, int(warmup))
        self.steps_done = 0
        self._graph = self._static = self._static_loss = self._side_stream = None

    def draw(self, x_all, y_all, idx):
        """(x0, y, noise, t) of one step, in the order the loops always drew them."""
        import torch

        g, batch = self.generator, len(idx)
        x0, y = x_all[idx], y_all[idx]
        dropped = torch.rand(batch, generator=g, device=g.device).to(self.device) < self.label_dropout
        y = torch.where(dropped, torch.full_like(y, self.null_class), y)  # no boolean indexing: no host sync
        noise = torch.randn(x0.shape, generator=g, device=g.device).to(self.device)
        t = torch.randint(0, self.timesteps, (batch,), generator=g, device=g.device).to(self.device)
        return x0, y, noise, t

    def loss(self, x0, y, noise, t):
        import torch

        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        return torch.nn.functional.mse_loss(self.unet(noisy, t, class_labels=y).sample, noise)

    def _eager(self, inputs):
        loss = self.loss(*inputs)
        self.optimizer.zero_grad(set_to_none=True)  # after the forward, as the loops always did: on the
        loss.backward()                              # CPU the other order cost more system time
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x_all, y_all, idx):
        inputs = self.draw(x_all, y_all, idx)
        self.steps_done += 1
        if not self.use_graph:
            return self._eager(inputs)
        import torch

        if self._graph is not None and inputs[0].shape != self._static[0].shape:
            raise ValueError(f"a CUDA graph step was captured for batches of {self._static[0].shape[0]}, "
                             f"got {inputs[0].shape[0]}")
        if self._graph is None and self.steps_done <= self.warmup:
            self._side_stream = self._side_stream or torch.cuda.Stream(self.device)
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side_stream):
                loss = self._eager(inputs)
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)
            return loss
        if self._graph is None:
            try:
                self._capture(inputs)
            except RuntimeError as err:  # a kernel that cannot be captured on this GPU, driver or torch
                warnings.warn(f"CUDA graph capture of the training step failed ({err}); stepping eagerly",
                              RuntimeWarning, stacklevel=2)
                self.use_graph, self._graph, self._static, self._static_loss = False, None, None, None
                return self._eager(inputs)  # recording ran nothing: this step is still to take
        for static, value in zip(self._static, inputs):
            static.copy_(value)
        self._graph.replay()
        return self._static_loss.detach().clone()

    def _capture(self, inputs) -> None:
        """Record forward, backward and the optimizer's update once; recording runs nothing."""
        import torch

        self._static = [value.clone() for value in inputs]
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph writes fresh gradients
        graph = torch.cuda.CUDAGraph()
        # on the warm-up's stream: the BLAS handles and workspaces it made there are reused, not
        # made mid-capture (what torch.cuda.make_graphed_callables does since torch 2.12)
        with torch.cuda.graph(graph, stream=self._side_stream):
            self._static_loss = self.loss(*self._static)
            self._static_loss.backward()
            self.optimizer.step()
        self._graph = graph
