"""Wide ResNet (Zagoruyko & Komodakis) with the module names of the TRADES / RobustBench
WideResNet (`conv1`, `block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`), so
that their checkpoints, the seed methods' robust teachers among them, load as they are.

`sub_block1: true` adds the unused block that the TRADES code defines (and saves), so a TRADES
checkpoint loads without unexpected keys; it takes no part in the forward pass.
"""

import torch.nn.functional as F
from torch import nn

from .base import MODELS
from .layers import GlobalAvgPool


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.convShortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int, sub_block1: bool = False):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide ResNet depth must be 6n+4 (16, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(self.pool(out))


@MODELS.register("wrn34_10")
def wide_resnet(
    num_classes: int = 10, in_channels: int = 3, depth: int = 34, widen_factor: int = 10, sub_block1: bool = False
) -> nn.Module:
    return WideResNet(depth, widen_factor, num_classes, in_channels, sub_block1)
