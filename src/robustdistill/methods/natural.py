"""Natural (clean) training with cross-entropy: how clean teachers are trained."""

from dataclasses import dataclass

import torch.nn.functional as F

from .base import METHODS, Method, MethodOptions


@METHODS.register("natural")
class Natural(Method):
    summary = "cross-entropy on clean inputs (the clean teacher)"
    paper = "none: standard training with the cross-entropy, how clean teachers are trained"

    @dataclass
    class Options(MethodOptions):
        name: str = "natural"

    selection_metric = "clean"
    adversarial = False

    def loss(self, x, y):
        logits = self.student(x)
        return F.cross_entropy(logits, y), {}
