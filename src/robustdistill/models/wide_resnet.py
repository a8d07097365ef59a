"""Wide ResNet (Zagoruyko & Komodakis) in the layout of the TRADES/RobustBench WRN-34-10,
the robust teacher of both seed methods. Depth and width are options (depth = 6n+4)."""

import torch.nn.functional as F
from torch import nn

from . import MODELS


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


@MODELS.register("wrn34_10")
def wide_resnet(num_classes: int = 10, in_channels: int = 3, depth: int = 34, widen_factor: int = 10) -> nn.Module:
    if (depth - 4) % 6:
        raise ValueError(f"wide ResNet depth must be 6n+4 (16, 28, 34, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
    cin = widths[0]
    for i, cout in enumerate(widths[1:]):
        for j in range(n):
            layers.append(WideBlock(cin, cout, (1 if i == 0 else 2) if j == 0 else 1))
            cin = cout
    layers += [
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, num_classes),
    ]
    return nn.Sequential(*layers)
