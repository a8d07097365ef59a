"""The WideResNet of DeepMind's adversarial-robustness code (Gowal et al. 2020/2021, Rebuffi et al.
2021, Wang et al. 2023: the generated-data entries at the top of RobustBench), with its module names
(`init_conv`, `layer.G.block.N.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}`, `batchnorm`,
`logits`), so that their checkpoints load as they are.

It differs from the TRADES WideResNet (`wrn34_10`) in more than names: the activation is SiLU
(`x * sigmoid(x)`, which those papers call swish), a strided convolution pads (0, 1, 0, 1) by hand
(TensorFlow's `SAME`) instead of 1 on every side, the first block of a group applies its
batch norm and activation before the shortcut, and the stem has no batch norm. The normalisation
by the dataset's mean and std, which DeepMind's module does inside (without saving it), is this
tool's `Classifier` normalisation in front of it.
"""

import torch.nn.functional as F
from torch import nn

from .base import MODELS
from .layers import GlobalAvgPool

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}


class DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), activation()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=0, bias=False)
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), activation()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None
        self.pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x):
        out = self.relu_0(self.batchnorm_0(x))
        if self.shortcut is not None:  # the shortcut sees the activated input
            x = out
        out = self.relu_1(self.batchnorm_1(self.conv_0(F.pad(out, self.pad))))
        out = self.conv_1(out)
        return (self.shortcut(x) if self.shortcut is not None else x) + out


class DMBlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, activation: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(
            *[DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, activation) for i in range(n)]
        )

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, activation: str):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (28, 34, 70, ...), got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        n, channels = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, 1, padding=1, bias=False)
        self.layer = nn.Sequential(
            *[DMBlockGroup(n, channels[g], channels[g + 1], 1 if g == 0 else 2, act) for g in range(3)]
        )
        self.batchnorm, self.relu = nn.BatchNorm2d(channels[3]), act()
        self.pool = GlobalAvgPool()  # on CIFAR's 8x8 last map: DeepMind's avg_pool2d(out, 8)
        self.logits = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.layer(self.init_conv(x))
        return self.logits(self.pool(self.relu(self.batchnorm(out))))


@MODELS.register("dm_wrn")
def dm_wide_resnet(
    num_classes: int = 10, in_channels: int = 3, depth: int = 28, width: int = 10, activation: str = "silu"
) -> nn.Module:
    """DeepMind's WideResNet: depth-width 28-10 and 70-16 in RobustBench's generated-data entries."""
    return DMWideResNet(depth, width, num_classes, in_channels, activation)
