"""The tensor-parallel process group: how ranks join it, the collectives kiln uses, failures in words.

One default torch.distributed group holds every rank: gloo on the CPU, NCCL on CUDA. Ranks join it
either over a TCP rendezvous rank 0 picked on this machine (ranks it spawned itself) or through
`env://` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from a launcher such as torchrun, on one machine
or several). A peer that dies closes its sockets, so the collective waiting on it raises at once
(gloo) instead of hanging; `timeout` bounds anything else.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import KilnError

DEFAULT_TIMEOUT_S = 300.0


class TensorParallelError(KilnError):
    """A rank of a tensor-parallel engine died or stopped answering; the engine cannot continue."""

    fatal = True  # the server's engine loop stops on it (/health then reports the engine dead)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def timeout_s() -> float:
    """Seconds a collective may wait for a peer (env KILN_TP_TIMEOUT, default 300)."""
    return float(os.environ.get("KILN_TP_TIMEOUT", DEFAULT_TIMEOUT_S))


class TPGroup:
    """This process's place in the group (`rank` of `world`) and the collectives over it."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def join(cls, rank: int, world: int, init_method: str, device: torch.device) -> TPGroup:
        """Join the default process group (blocks until all `world` ranks have joined)."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s()))
        return cls(rank, world, device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks (in place when `t` is contiguous); returns the sum."""
        t = t.contiguous()
        dist.all_reduce(t)
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' `t` [..., n] laid side by side in rank order: [..., world * n]."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others pass None): one pickled message."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def leave(self) -> None:
        """Leave the process group (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def describe(exc: BaseException) -> str:
    """An exception as one line another rank can print (a str always pickles; exceptions may not)."""
    return f"{type(exc).__name__}: {exc}"
