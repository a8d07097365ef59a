"""CIFAR-style ResNets: ResNet-18 and PreAct ResNet-18 (3x3 stem, no max-pool, four stages),
and the thin ResNet-56 of He et al. (three stages of 16/32/64 channels, parameter-free
"option A" shortcuts), which B-MTARD uses as its clean teacher.

Module names follow the CIFAR code the distillation papers build on (`conv1`, `bn1`,
`layer1..4`, `shortcut`, `linear`; PreAct's final norm is `bn`), so their checkpoints load.
Global average pooling is adaptive, so the same networks also run on small inputs (digits).
"""

import functools

import torch.nn.functional as F
from torch import nn

from .base import MODELS
from .layers import GlobalAvgPool


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual; the shortcut is a 1x1 conv-BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = self.make_shortcut(cin, cout, stride)

    def make_shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        if stride != 1 or cin != cout:
            return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """shortcut_from_input: the projection shortcut sees the block's input rather than its activated
    input (RobustBench's PreActBlock, e.g. Wong2020Fast; the default is its PreActBlockV2)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut_from_input: bool = False):
        super().__init__()
        self.shortcut_from_input = shortcut_from_input
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.shortcut_from_input else out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes, in_channels, width=64, preact=False, final_bn=True):
        super().__init__()
        self.preact, self.final_bn = preact, preact and final_bn
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(num_blocks):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, (1 if i == 0 else 2) if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        if self.final_bn:
            self.bn = nn.BatchNorm2d(cin)
        self.pool = GlobalAvgPool()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.final_bn:
            out = F.relu(self.bn(out))
        out = self.pool(out)
        return self.linear(out)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10, in_channels: int = 3, width: int = 64, shortcut: str = "activated", final_bn: bool = True
) -> nn.Module:
    """shortcut: what a projection shortcut sees, `activated` (the block's input after its batch norm
    and ReLU) or `input`; final_bn: a batch norm and ReLU before the pooling. The defaults are the
    CFA / FRL code's PreActResNet-18 and RobustBench's PreActBlockV2 with bn_before_fc;
    `shortcut: input, final_bn: false` is RobustBench's plain PreActResNet (Wong2020Fast)."""
    if shortcut not in ("activated", "input"):
        raise ValueError(f"shortcut must be activated or input, got {shortcut!r}")
    block = functools.partial(PreActBlock, shortcut_from_input=shortcut == "input")
    return ResNet(block, [2, 2, 2, 2], num_classes, in_channels, width, preact=True, final_bn=final_bn)


class _OptionAShortcut(nn.Module):
    """He et al.'s parameter-free CIFAR shortcut: subsample, then zero-pad the new channels."""

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)) if self.pad else x


class _ThinBlock(BasicBlock):
    """The CIFAR ResNet-56 block: a BasicBlock with the parameter-free option-A shortcut."""

    def make_shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        return _OptionAShortcut(stride, cout - cin)


class _DownsampleBlock(BasicBlock):
    """The block of the MTARD / B-MTARD code's CIFAR ResNet (chenyaofo/pytorch-cifar-models): a 1x1
    conv-BN projection shortcut where the shape changes, named `downsample`."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        projection = self.shortcut
        del self.shortcut
        self.downsample = projection if len(projection) else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ThinResNet(nn.Module):
    """layout `he`: option-A shortcuts, classifier `linear` (He et al.; the seed methods' code);
    `mtard`: projection shortcuts `downsample`, classifier `fc` (the MTARD code's clean teacher)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int = 16, layout: str = "he"):
        super().__init__()
        if layout not in ("he", "mtard"):
            raise ValueError(f"layout must be he or mtard, got {layout!r}")
        block, self.head = (_ThinBlock, "linear") if layout == "he" else (_DownsampleBlock, "fc")
        if (depth - 2) % 6:
            raise ValueError(f"thin ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i in range(3):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = GlobalAvgPool()
        setattr(self, self.head, nn.Linear(cin, num_classes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return getattr(self, self.head)(self.pool(out))


@MODELS.register("resnet56")
def resnet56(
    num_classes: int = 10, in_channels: int = 3, depth: int = 56, width: int = 16, layout: str = "he"
) -> nn.Module:
    """layout: `he` (option-A shortcuts, `linear`) or `mtard` (the MTARD code's CIFAR ResNet-56,
    chenyaofo/pytorch-cifar-models: projection shortcuts `downsample`, classifier `fc`), whose
    file the MTARD / B-MTARD recipes' clean teacher is."""
    return ThinResNet(depth, num_classes, in_channels, width, layout)
