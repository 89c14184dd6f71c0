"""Networks for the experiments: a small CNN for the embedded 28x28 / 8x8
images, and the CIFAR ResNet-32 of He et al. (2016) that the paper trains on
CIFAR-LT (section 3).

Both end in a linear classifier named ``fc``, so ``model.fc.parameters()``
can serve as the parameters ``theta`` of the hypergradient (docs/math.md section
5), and both take the input channel count and ``num_classes``.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autobalance._validation import check_int

MODELS = ("small_cnn", "resnet32")


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, batch norm, ReLU, 2x2 max pool) with ``width``
    and ``2 * width`` channels, a 2x2 adaptive average pool, and ``fc``.

    Works for any input of at least 4x4 pixels (8x8 digits, 28x28 MNIST,
    32x32 CIFAR); ``fc`` sees ``8 * width`` features.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        check_int(num_classes, "num_classes", 2)
        check_int(in_channels, "in_channels", 1)
        check_int(width, "width", 1)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity shortcut (He et al. 2016).

    Where the shape changes the shortcut is option ``"A"`` (subsample by the
    stride and zero-pad the new channels: no parameters, as in the paper's
    CIFAR ResNets) or ``"B"`` (a strided 1x1 conv with batch norm).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra_channels = stride, planes - in_planes
        self.shortcut_kind = shortcut
        self.shortcut = nn.Identity()
        if (stride != 1 or in_planes != planes) and shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def _residual(self, x):
        if self.shortcut_kind == "B" or (self.stride == 1 and self.extra_channels == 0):
            return self.shortcut(x)
        x = x[:, :, ::self.stride, ::self.stride]
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._residual(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 conv with
    ``widths[0]`` channels, three stages of ``(depth - 2) / 6`` basic blocks
    with ``widths`` channels (the 2nd and 3rd start with stride 2), global
    average pooling and ``fc``. ``depth = 32`` is ResNet-32 (5 blocks a
    stage, ~0.46M parameters with option-A shortcuts and 10 classes).

    Weights are initialised with Kaiming-normal (convs and ``fc``), as in the
    long-tailed CIFAR code the paper builds on (LDAM-DRW).
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A",
                 widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        check_int(depth, "depth", 8)
        if (depth - 2) % 6:
            raise ValueError(f"autobalance: CifarResNet `depth` must be 6 n + 2 (20, 32, 44, 56, 110), got {depth}")
        check_int(num_classes, "num_classes", 2)
        check_int(in_channels, "in_channels", 1)
        if shortcut not in ("A", "B"):
            raise ValueError(f"autobalance: `shortcut` must be 'A' (zero padding) or 'B' (1x1 projection), "
                             f"got {shortcut!r}")
        widths = tuple(widths)
        if len(widths) != 3:
            raise ValueError(f"autobalance: `widths` must be three channel counts, got {widths!r}")
        for width in widths:
            check_int(width, "widths[i]", 1)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[N, widths[2]]`` penultimate features that ``fc`` reads."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 for 32x32 images (the paper's CIFAR-LT network)."""
    return CifarResNet(32, num_classes, in_channels, shortcut)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A model of ``MODELS`` by name: ``"small_cnn"`` or ``"resnet32"``."""
    if name == "small_cnn":
        return SmallCNN(num_classes, in_channels)
    if name == "resnet32":
        return resnet32(num_classes, in_channels)
    raise ValueError(f"autobalance: unknown model `name` = {name!r}; expected one of {MODELS}")


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits = normalize(x) normalize(W)``, each in
    ``[-1, 1]``; LDAM (Cao et al., 2019) scales these by ``s = 30``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=0)


def with_cosine_classifier(model: nn.Module) -> nn.Module:
    """Replaces ``model.fc`` by a :class:`NormedLinear` of the same shape (for LDAM)."""
    model.fc = NormedLinear(model.fc.in_features, model.fc.out_features)
    return model
