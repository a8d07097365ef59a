"""MobileNetV2 for 32x32 inputs, in the layout of the CIFAR code the distillation papers use
(`conv1`, `bn1`, `layers.N.{conv1,bn1,conv2,bn2,conv3,bn3,shortcut}`, `conv2`, `bn2`, `linear`):
the stem and the second stage at stride 1, ReLU activations, and a projected shortcut in every
stride-1 block whose width changes."""

import torch.nn.functional as F
from torch import nn

from .base import MODELS
from .layers import GlobalAvgPool

# (expansion, out_channels, num_blocks, stride)
_CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width_mult: float = 1.0):
        super().__init__()
        stem = int(32 * width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, cin = [], stem
        for expansion, cout, n, stride in _CIFAR_CFG:
            cout = max(1, int(cout * width_mult))
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, expansion, stride if j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        last = int(1280 * max(1.0, width_mult))
        self.conv2 = nn.Conv2d(cin, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.pool = GlobalAvgPool()
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return self.linear(self.pool(out))


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, width_mult)
