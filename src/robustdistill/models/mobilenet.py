"""MobileNetV2 for 32x32 inputs: the ImageNet layout with the stem and the second stage at
stride 1 (as in the CIFAR versions used by the distillation papers)."""

import torch.nn.functional as F
from torch import nn

from . import MODELS

# (expansion, out_channels, num_blocks, stride)
_CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width_mult: float = 1.0):
        super().__init__()
        stem = int(32 * width_mult)
        layers = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
        cin = stem
        for expansion, cout, n, stride in _CIFAR_CFG:
            cout = int(cout * width_mult)
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, expansion, stride if j == 0 else 1))
                cin = cout
        last = int(1280 * max(1.0, width_mult))
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, width_mult)
