"""Measuring work: FLOPs of a step, durations for people, the time left of a run.

with FlopCount() as count:
    loss, stats = train_batch(run, x, y, tally)
print(count.total, duration(time_left(elapsed, done=3, remaining=7)))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the operators torch knows a formula for (matmul, convolution, attention:
    the operators that matter), forward and backward, including `torch.autograd.grad` inside the
    inner maximisation (torch's FlopCounterMode cannot: its module hooks break autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            # under inference mode composite operators (conv2d, linear) arrive undecomposed: count
            # what they decompose into (convolution, addmm), as without it
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


@contextlib.contextmanager
def intra_op_threads(count: Optional[int]) -> Iterator[None]:
    """torch's intra-op CPU thread count set to `count` for the block (None: left as it is), then
    restored: a run's results depend on it, so a run sets its own (`train.threads`)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing a step on CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_left(elapsed: float, done: int, remaining: int) -> float:
    """Seconds the `remaining` epochs take at the mean wall time of the `done` ones (validation and
    checkpoints included, as often as they ran so far)."""
    return elapsed / done * remaining if done else float("nan")


def duration(seconds: float) -> str:
    """A duration for people: 0.4s, 42s, 12m 05s, 3h 07m."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
