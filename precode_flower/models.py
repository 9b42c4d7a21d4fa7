"""The paper's models: an MLP, a small ConvNet and a ResNet-18 for 28x28/32x32 images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

MODELS: tuple[str, ...] = ("mlp", "convnet", "resnet18")


def mlp(num_classes: int, input_shape: Sequence[int], width: int = 1024) -> nn.Module:
    """The PRECODE paper's MLP: flatten, 1024, ReLU, 1024, ReLU, classifier."""
    in_features = int(torch.Size(input_shape).numel())
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


class ConvNet(nn.Module):
    """A small LeNet/ConvNet-style CNN of the kind gradient inversion papers attack.

    Three 3x3 conv + ReLU stages (the last two with stride 2), then a hidden fully
    connected layer and the classifier: small enough to train and attack on a CPU.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], width: int = 32) -> None:
        super().__init__()
        channels, height, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = 2 * width * ((height + 3) // 4) * ((w + 3) // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images (3x3 stem, no max-pool, 1 or 3 channels)."""
    # Imported here: torchvision pulls in torch._dynamo (~0.3 s and ~100 MB per process),
    # which the MLP and ConvNet clients of a simulation never need.
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


_BUILDERS: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    "mlp": mlp,
    "convnet": ConvNet,
    "resnet18": resnet18,
}


def build(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for ``input_shape`` = (C, H, W)."""
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _BUILDERS[key](num_classes, tuple(input_shape))
