"""Tensor parallelism: the ranks of one engine (`TPGroup`) and how a model splits over them.

Every rank builds the model inside `tensor_parallel(group)`; layers that split read the group
with `current_tp()` while they are built (as `deferred_weights()` does for quantized builds)
and keep it. One rank (`SINGLE`, the default) is today's model: the split helpers return
None / the whole, and no layer changes, so the one-device path has no extra work.

The group wraps a torch.distributed process group built from a store, not the global default
group, so an engine's ranks never collide with another engine (or the user's own
`init_process_group`) in the same process. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
from dataclasses import dataclass
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError

# A collective waits this long for the other ranks (a rank that died fails it sooner: the
# connection closes). Long enough for a slow CPU prefill of a full token budget.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TPGroup:
    """This process's rank among `size` tensor-parallel ranks, and their process group."""

    rank: int = 0
    size: int = 1
    pg: Any = None  # torch.distributed ProcessGroupGloo / ProcessGroupNCCL; None for one rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        self.pg.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype), in place."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([x], opts).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x [..., n]` concatenated on rank 0 (`[..., size * n]`); the other ranks
        get an empty `[..., 0]` (they compute nothing from it)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        opts = torch.distributed.GatherOptions()
        opts.rootRank = 0
        self.pg.gather([parts] if self.rank == 0 else [], [x], opts).wait()
        return torch.cat(parts, -1) if self.rank == 0 else x[..., :0]

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. the KV blocks every rank can hold)."""
        x = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN
        self.pg.allreduce([x], opts).wait()
        return int(x.item())

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live for collectives (NCCL: its GPU)."""
        if self.pg is not None and self.pg.name() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = TPGroup()
_CURRENT: contextvars.ContextVar[TPGroup] = contextvars.ContextVar("polymodal_tp", default=SINGLE)


@contextlib.contextmanager
def tensor_parallel(group: TPGroup):
    """Layers built inside split over `group` (models read it with `current_tp()`)."""
    token = _CURRENT.set(group)
    try:
        yield group
    finally:
        _CURRENT.reset(token)


def current_tp() -> TPGroup:
    """The group the model being built splits over (`SINGLE` outside `tensor_parallel`)."""
    return _CURRENT.get()


def join_group(rank: int, size: int, store_path: str, backend: str) -> TPGroup:
    """Join the ranks meeting at the file store `store_path` (blocks until all have joined,
    at most `COLLECTIVE_TIMEOUT`). `backend`: "gloo" or "nccl"."""
    import torch.distributed as dist

    store = dist.FileStore(store_path, size)
    if backend == "nccl":
        pg = dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    return TPGroup(rank, size, pg)


def split_evenly(total: int, tp: TPGroup, what: str) -> tuple[int, int]:
    """(start, size) of this rank's equal part of `total` features; `what` names them in the
    error when they do not divide."""
    if total % tp.size:
        raise InvalidInputError(
            f"tensor_parallel_size={tp.size} does not divide the model's {what}={total}"
        )
    size = total // tp.size
    return tp.rank * size, size


@dataclass(frozen=True)
class HeadSplit:
    """This rank's attention heads: `num_heads` query heads from global head `q_start`, and
    `num_kv_heads` kv heads from global kv head `kv_start`."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def split_heads(num_heads: int, num_kv_heads: int, tp: TPGroup) -> HeadSplit:
    """Query heads split evenly; kv heads too when there are at least as many as ranks, else
    each rank holds the one kv head its query heads read (replicated over `size / kv` ranks)."""
    check_heads(num_heads, num_kv_heads, tp.size)
    q_start, q_heads = split_evenly(num_heads, tp, "num_attention_heads")
    if num_kv_heads >= tp.size:
        kv_start, kv_heads = split_evenly(num_kv_heads, tp, "num_key_value_heads")
    else:  # replicated: ranks r of a run of size / kv ranks share kv head r * kv // size
        kv_start, kv_heads = tp.rank * num_kv_heads // tp.size, 1
    return HeadSplit(q_heads, kv_heads, q_start, kv_start)


def check_heads(num_heads: int, num_kv_heads: int, size: int) -> None:
    """InvalidInputError unless `size` ranks can split these heads (see `split_heads`)."""
    if num_heads % size:
        raise InvalidInputError(
            f"tensor_parallel_size={size} does not divide the model's "
            f"num_attention_heads={num_heads}"
        )
    if num_kv_heads % size and size % num_kv_heads:
        raise InvalidInputError(
            f"tensor_parallel_size={size} and the model's num_key_value_heads={num_kv_heads}: "
            "one must divide the other (kv heads are split, or replicated when fewer)"
        )
