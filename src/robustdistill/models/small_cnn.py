"""A small CNN for the embedded 8x8 digits: fast enough to adversarially train on a laptop CPU."""

from torch import nn

from .base import MODELS
from .layers import GlobalAvgPool


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two conv stages (width, 2*width) with a 2x max-pool between, global average pool, linear."""
    return nn.Sequential(
        *_block(in_channels, width),
        *_block(width, width),
        nn.MaxPool2d(2),
        *_block(width, 2 * width),
        *_block(2 * width, 2 * width),
        GlobalAvgPool(),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
