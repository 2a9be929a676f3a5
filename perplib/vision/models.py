"""ResNets for the vision track (paper Section 3.1: ResNet-50 on ImageNet).

``resnet18`` / ``resnet50`` are torchvision's (random init; we pretrain ourselves, Appendix A.1).
For small inputs (28x28 Fashion-MNIST, 8x8 digits) the stem becomes a 3x3 stride-1 convolution
without max-pooling, the usual small-image variant, so the feature maps do not vanish.
``resnet-tiny`` / ``resnet-small`` are three-stage ResNets built from torchvision's BasicBlock
for laptops and tests. ``resnet18-half`` (the embedded profile's model) is ResNet-18 at half
width (32-64-128-256 channels, 2.8M parameters for 10 classes) with a 3x3 stride-2 stem and no
max-pooling, so a 28x28 image enters the first stage at 14x14: wide enough that the paper's LoRA
ranks (1-10) train a small share of the model, as on ResNet-50.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

VISION_MODELS = ("resnet18", "resnet50", "resnet18-half", "resnet-small", "resnet-tiny")
SMALL_INPUT = 64  # images below this side length get the small-input stem
_SMALL = {"resnet-small": ((16, 32, 64), (2, 2, 2)), "resnet-tiny": ((8, 16, 32), (1, 1, 1))}


def is_vision_model(name: str) -> bool:
    return name in VISION_MODELS


class SmallResNet(nn.Module):
    """A three-stage ResNet (He et al. 2015, the CIFAR layout) of torchvision BasicBlocks."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, width_in = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                down = None
                if j == 0 and (stride != 1 or width_in != width):
                    down = nn.Sequential(tv.conv1x1(width_in, width, stride), nn.BatchNorm2d(width))
                layers.append(tv.BasicBlock(width_in, width, stride if j == 0 else 1, down))
                width_in = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def half_resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 layout at half width with a 3x3 stride-2 stem and no max-pooling."""
    model = tv.ResNet(tv.BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width_per_group=64)
    widths, width_in = (32, 64, 128, 256), 32
    model.conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(32)
    model.maxpool = nn.Identity()
    for i, width in enumerate(widths):
        blocks = []
        for j in range(2):
            stride = 2 if i > 0 and j == 0 else 1
            down = None
            if j == 0 and (stride != 1 or width_in != width):
                down = nn.Sequential(tv.conv1x1(width_in, width, stride), nn.BatchNorm2d(width))
            blocks.append(tv.BasicBlock(width_in, width, stride, down))
            width_in = width
        setattr(model, f"layer{i + 1}", nn.Sequential(*blocks))
    model.fc = nn.Linear(width_in, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224, seed: int = 0
) -> nn.Module:
    """A freshly initialised (seeded) vision model for images of ``in_channels x image_size^2``."""
    if name not in VISION_MODELS:
        raise ValueError(f"vision model must be one of {list(VISION_MODELS)}, got {name!r}")
    torch.manual_seed(seed)
    if name in _SMALL:
        widths, blocks = _SMALL[name]
        return SmallResNet(widths, blocks, in_channels, num_classes)
    if name == "resnet18-half":
        return half_resnet18(in_channels, num_classes)
    model = getattr(tv, name)(weights=None, num_classes=num_classes)
    if image_size < SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def head_name(model: nn.Module) -> str:
    """Qualified name of the classification head: the last ``nn.Linear`` in the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classification head")
    return names[-1]


def first_conv_name(model: nn.Module) -> str:
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return n
    raise ValueError(f"{type(model).__name__} has no convolution")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def accuracy(model: nn.Module, batches, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (%) over an iterable of ``(images, labels)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy over an empty split")
    return 100.0 * correct / total
