"""DistributedDataParallel plumbing: one process per GPU, launched by `torchrun`.

Everything here is a no-op in a single process, so the loop and the methods call it freely.
Adaptive state (class-wise sums, entropies, losses) is all-reduced through these helpers so
that every rank holds identical temperatures and weights.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError, TrainingError, UserError

log = logging.getLogger("robustdistill")

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_hint: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number: launch with torchrun") from None
    if world_size <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "launch with torchrun (which sets them all), or unset WORLD_SIZE for one process"
        )
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_hint != "cpu"
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_device(name: str, key: str = "device") -> None:
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"{key}={name} is not a device; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str, dist_info: DistInfo, key: str = "train.device") -> torch.device:
    """The torch device `name` stands for (`key`: the setting it came from, for the error message):
    auto is a GPU where there is one; under DDP, cuda is this process's own GPU (LOCAL_RANK)."""
    check_device(name, key)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{dist_info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available; use {key}=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps but MPS (Apple GPU) is not available here; use {key}=cpu or auto")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Whether this process speaks for the group: rank 0 of a joined process group, or a lone process
    (a stray RANK variable without a process group does not silence it)."""
    return not is_distributed() or dist.get_rank() == 0


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 alone, its result given to every rank (a `UserError` it raises is
    raised on every rank, so none waits for the others forever); in one process, just `compute()`."""
    if not is_distributed():
        return compute()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, compute())]
        except UserError as exc:
            box = [(False, str(exc))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The mean of `t` over the ranks; with `count` (how many samples this rank's `t` averages over),
    the mean weighted by it: the value of the whole global batch, also when ranks hold different
    numbers of samples. In one process `t` itself, untouched."""
    if is_distributed():
        if count is None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            weighted = torch.cat([t.flatten() * count, t.new_full((1,), float(count))])
            dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
            t.copy_((weighted[:-1] / weighted[-1]).view_as(t))
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP broadcasts them only at the
    start of each forward through the wrapper, so after an epoch each rank holds the statistics of
    its own last batch; validation, the checkpoint and a resume must all see one set."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (just `[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, obj)
    return values


def owned_indices(n: int, block: int, rank: int, world_size: int) -> torch.Tensor:
    """The sample indices (of 0..n-1) a rank evaluates: blocks of `block` consecutive samples,
    dealt round-robin. Batches and chunks are cut inside blocks, so every sample is attacked in
    the same batch, with the same randomness, whatever the number of ranks."""
    index = torch.arange(n)
    return index[(index // block) % world_size == rank]


def assemble(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample booleans computed by each rank for its `index`, as one length-n vector on every rank."""
    full = torch.zeros(n, dtype=torch.int32, device=values.device)
    full[index.to(values.device)] = values.int()
    return all_reduce_sum(full) > 0


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank, so all ranks stop together."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_ranks_agree(value, what: str) -> None:
    """Adaptive state must be identical on every rank; a divergence is a bug, never silent."""
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        raise TrainingError(f"{what} differs between DDP ranks: {values}")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rng_states(device: torch.device) -> dict[str, list]:
    """Every rank's random state (collective: all ranks call it), so a DDP resume continues each stream."""
    states = {"rng": gather_objects(torch.get_rng_state())}
    if device.type == "cuda":
        states["cuda_rng"] = gather_objects(torch.cuda.get_rng_state(device))
    return states


def restore_rng(states: dict[str, list], dist_info: DistInfo, device: torch.device) -> None:
    """This rank's stream of `rng_states`; on another number of processes, a warning."""
    saved = len(states["rng"])
    if saved != dist_info.world_size:
        log.warning(
            "resuming on %d process(es) a run trained on %d: random streams differ from an uninterrupted run",
            dist_info.world_size,
            saved,
        )
    torch.set_rng_state(states["rng"][dist_info.rank % saved])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"][dist_info.rank % len(states["cuda_rng"])], device)
