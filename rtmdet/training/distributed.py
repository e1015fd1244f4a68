"""torchrun support: read the launcher's environment, pick the device, start and end the group.

`torchrun --nproc-per-node N -m rtmdet train ...` sets WORLD_SIZE, RANK and LOCAL_RANK; each
process trains on its own GPU (NCCL) or, on a CPU-only machine, its own cores (gloo).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rtmdet.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among world_size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # this module started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """auto -> cuda when available, else cpu; under torchrun, cuda means cuda:LOCAL_RANK.
    `what` names the setting in error messages."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {name!r}: CUDA is not available on this machine")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise ConfigError(f"{what} {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def setup(device_name: str, timeout_min: float = 30.0) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 validates alone while the others wait in a barrier: allow for a long validation.
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_min), **kwargs)
        log.info("rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return DistInfo(rank, local_rank, world_size, device, owns)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (only when this module's setup joined one)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True when `flag` is true on any rank (an all-reduce; every rank must call it)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (every rank must call it)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0)


def average_gradients(module: torch.nn.Module, info: DistInfo) -> None:
    """Average the gradients of a module that DDP does not wrap (the distillation adapters) over
    the ranks: one all-reduce of their concatenation (every rank must call it)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not info.distributed or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
    if info.distributed:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)


def host_group(info: DistInfo) -> dist.ProcessGroup | None:
    """A gloo group of every rank, for host objects (None in a single process; every rank must call it)."""
    return dist.new_group(backend="gloo") if info.distributed else None


class HostMax:
    """The largest of an integer over every rank, through a CPU (gloo) group: agreement on a step's
    shape without a CUDA sync. Every rank must create it, and call it at the same steps."""

    def __init__(self, info: DistInfo):
        self.group = host_group(info)

    def __call__(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def same_on_every_rank(tensors: list[torch.Tensor], info: DistInfo) -> bool:
    """True when every rank holds the same values (compared through one float64 checksum: bitwise
    equal weights give bitwise equal sums). Every rank must call it."""
    if not info.distributed:
        return True
    with torch.no_grad():
        total = torch.stack([t.detach().double().sum() for t in tensors]).sum()
        both = torch.stack([total, -total])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # [max, -min]
    return bool(both[0] == -both[1])
