"""The VGG-9 classifier of the FIMI experiments, weight exchange with Flower, and a plain
train / evaluate loop shared by the clients and the learning-curve measurement.

VGG-9 is FedMA's "ModerateCNN" (Wang et al., 2020), the model [FIMI §V-A] prices at
3,491,530 parameters: six 3x3 convolutions (padding 1, ReLU) in three blocks, each closed by
a 2x2 max-pool, then three fully connected layers; no BatchNorm, so every parameter is a
weight that FedAvg averages and nothing is a running statistic.

    conv 32, conv 64, pool | conv 128, conv 128, pool, Dropout2d(0.05) |
    conv 256, conv 256, pool | flatten, dropout(0.1), fc 512, fc 512, dropout(0.1), fc C

Weights start He-normal (see `VGG9.reset_parameters`). `width` scales every channel and
hidden-unit count (rounded, at least 1), which is how the digits
default is made small enough to train in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

# FedMA's channel and hidden widths at width = 1.
CONV_CHANNELS = (32, 64, 128, 128, 256, 256)
FC_UNITS = (512, 512)
POOL_AFTER = (1, 3, 5)  # conv indices followed by a 2x2 max-pool

# The digits default: width 1/4 on 8x8x1 inputs, 10 classes. The three pools take 8x8 to
# 1x1, so the classifier sees 64 features: 96,682 parameters (vs 3,491,530 for VGG-9).
DIGITS_WIDTH = 0.25
# MNIST-sized grey images (28x28x1, mnist5k): width 1/2, 645,194 parameters. A step costs a
# quarter of full width's on a CPU (41 vs 140 ms for 16 images, one thread), so a 30-round
# run takes minutes, not a quarter of an hour; 28x28 digits need no more.
MNIST_WIDTH = 0.5


class VGG9(nn.Module):
    """FedMA's ModerateCNN with configurable input, classes and width (see module docstring)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 (three 2x2 pools), got {image_size}")
        if width <= 0 or num_classes < 1 or in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be positive")
        channels = [max(1, round(c * width)) for c in CONV_CHANNELS]
        hidden = [max(1, round(u * width)) for u in FC_UNITS]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(previous, c, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(2, 2))
            if i == 3:
                layers.append(nn.Dropout2d(p=0.05))
            previous = c
        self.conv_layer = nn.Sequential(*layers)
        side = image_size // 8
        self.fc_layer = nn.Sequential(
            nn.Dropout(p=0.1),
            nn.Linear(channels[-1] * side * side, hidden[0]), nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
            nn.Dropout(p=0.1),
            nn.Linear(hidden[1], num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights, zero biases.

        Without BatchNorm, PyTorch's default init (kaiming-uniform, a = sqrt 5) shrinks the
        signal layer by layer: the digits variant then sits at chance for hundreds of SGD
        steps at lr 0.02, while with He init it reaches ~95% test accuracy in 300 steps.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layer(torch.flatten(self.conv_layer(x), 1))


def model_for_images(images_shape: Sequence[int], num_classes: int, width: float | None = None) -> VGG9:
    """VGG-9 sized for uint8 images [N, H, W, C]: full width for 32x32 data, 1/2 for 28x28,
    1/4 for 8x8 digits."""
    _, height, side, channels = images_shape
    if height != side:
        raise ValueError(f"square images expected, got {height}x{side}")
    if width is None:
        width = DIGITS_WIDTH if side < 16 else MNIST_WIDTH if side < 32 else 1.0
    return VGG9(in_channels=channels, image_size=side, num_classes=num_classes, width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The state dict as float32 numpy arrays, in the model's order (Flower's NDArrays)."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays from `get_weights` order; a count or shape mismatch raises ValueError."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"got {len(arrays)} arrays, the model has {len(state)} tensors")
    new_state = {}
    for (name, current), array in zip(state.items(), arrays):
        if tuple(np.shape(array)) != tuple(current.shape):
            raise ValueError(f"{name}: shape {tuple(np.shape(array))}, the model expects {tuple(current.shape)}")
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(new_state, strict=True)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (the same scaling as the generator)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int = 1, lr: float = 0.02,
          batch_size: int = 64, momentum: float = 0.0, min_steps: int = 0, seed: int = 0,
          unlabelled: np.ndarray | None = None, threshold: float = 0.95) -> float:
    """Plain SGD on cross-entropy for `epochs` passes (at least `min_steps` batches); returns the mean loss.

    FIMI's local update is SGD with lr 0.02, batch 64 ([FIMI §V-A]); `min_steps` lets a
    tiny dataset still get enough updates to converge (learning curves).

    `unlabelled` images (the SEMI baseline) add the pseudo-label loss of FixMatch without its
    augmentations: every step also takes a batch of them, labels each by the model's own
    prediction, and adds the cross-entropy of those whose top probability reaches `threshold`
    (averaged over the whole unlabelled batch, so a doubtful model learns little from them).
    """
    if len(labels) == 0:
        raise ValueError("no training samples")
    generator = torch.Generator().manual_seed(seed)
    x, y = images_to_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    x_u = images_to_tensor(unlabelled) if unlabelled is not None and len(unlabelled) else None
    unlabelled_draws = torch.Generator().manual_seed(seed + 1)  # the labelled batches stay as without SEMI
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    batches_per_epoch = -(-len(y) // batch_size)
    epochs = max(epochs, -(-min_steps // batches_per_epoch))
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            if x_u is not None:
                loss = loss + pseudo_label_loss(model, x_u[torch.randint(len(x_u), (batch_size,), generator=unlabelled_draws)],
                                                threshold)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / steps


def pseudo_label_loss(model: nn.Module, x_u: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy against the model's own confident predictions, zero for the others."""
    logits = model(x_u)
    confidence, pseudo = torch.softmax(logits.detach(), dim=1).max(1)
    mask = (confidence >= threshold).float()
    return (nn.functional.cross_entropy(logits, pseudo, reduction="none") * mask).mean()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    if len(labels) == 0:
        raise ValueError("no evaluation samples")
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images_to_tensor(images[start:start + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(labels)
