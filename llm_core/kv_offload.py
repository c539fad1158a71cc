"""A host-memory tier under the prefix cache (vLLM's `kv_offloading_size` GiB with its "native"
backend): full blocks the device pool evicts are copied to host memory, and a prefix the
device cache no longer holds is copied back instead of being computed again.

The KV manager (kv_cache.py, pure Python) decides: when it hands out a free block that still
holds a cached prefix block, `save` gives that content a host slot (the least recently used
one when all are taken); when a request's prefix runs past the device cache, `lookup` finds the
next blocks by their hashes here and `load` queues their copy into fresh device blocks, which
then count as cached. The copies are queued in order and run by the runner at the start of
its next step (`run_pending`), before that step's forward writes any block: on one CUDA
stream (pinned host memory, asynchronous), so a save always reads what the steps before it
wrote and a load always follows the save that filled its slot. The queue runs in batches (a
run of saves or of loads, each slot and block once): per KV tensor one gather (or scatter)
kernel over the batch's device blocks and one copy per run of consecutive host slots, not a
copy per block and tensor (a 2000-token prefix of a 7B: ~56 launches, not ~7000).

One host slot holds a block id's pages in every KV tensor (and in a drafter's). Layouts of one
full-attention group only (no sliding windows, chunked, cross or MLA layers: as vLLM's).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from polymodal.llm_core.host_copy import to_device


class HostKVTier:
    """`num_blocks` host slots mirroring the device pool's pages of `tensors` (the KV tensors,
    each `[planes, blocks, block_size, heads, dim]`, each once); a slot's pages of one tensor
    are contiguous in host memory (`host[i][slot]`: `[planes, block_size, heads, dim]`)."""

    def __init__(self, tensors: list[torch.Tensor], num_blocks: int):
        self.tensors = tensors
        pin = tensors[0].is_cuda
        self.host = [
            torch.zeros((num_blocks, t.shape[0], *t.shape[2:]), dtype=t.dtype, pin_memory=pin)
            for t in tensors
        ]
        self.num_blocks = num_blocks
        self.slots: OrderedDict[tuple, int] = OrderedDict()  # block key -> slot, LRU first
        self.free = list(range(num_blocks - 1, -1, -1))
        self.pending: list[tuple[bool, int, int]] = []  # (save?, device block, host slot)
        self.num_saved = self.num_loaded = 0  # blocks copied out / back (statistics)

    @staticmethod
    def blocks_for(size_gib: float, tensors: list[torch.Tensor]) -> int:
        """Host slots `size_gib` GiB holds for these tensors' pages (at least 1)."""
        per_block = sum(t[:, 0].numel() * t.element_size() for t in tensors)
        return max(1, int(size_gib * (1 << 30)) // per_block)

    def save(self, block_id: int, key: tuple) -> None:
        """Keep device block `block_id` (its prefix-cache key `key`) before it is reused."""
        if key in self.slots:  # the same content is here already
            self.slots.move_to_end(key)
            return
        slot = self.free.pop() if self.free else self.slots.popitem(last=False)[1]
        self.slots[key] = slot
        self.pending.append((True, block_id, slot))
        self.num_saved += 1

    def lookup(self, key: tuple) -> int | None:
        """The host slot holding `key`'s block, or None."""
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
        return slot

    def load(self, slot: int, block_id: int) -> None:
        """Queue host slot `slot`'s copy into device block `block_id`."""
        self.pending.append((False, block_id, slot))
        self.num_loaded += 1

    def run_pending(self) -> None:
        """Run the queued copies in order (the runner, before a step's forward)."""
        if not self.pending:
            return
        ops, self.pending = self.pending, []
        with torch.inference_mode():
            for save, blocks, slots in _batches(ops):
                ids = to_device(blocks, torch.int64, self.tensors[0].device)
                for device, host in zip(self.tensors, self.host):
                    pages = device.transpose(0, 1)  # [blocks, planes, ...]
                    if save:  # gathered into one contiguous buffer, then copied out in runs
                        staged = pages[ids]
                        for i, j, slot in _runs(slots):
                            host[slot : slot + j - i].copy_(staged[i:j], non_blocking=True)
                    else:  # copied in by runs of slots, then scattered to the blocks
                        parts = [host[slot : slot + j - i].to(device.device, non_blocking=True)
                                 for i, j, slot in _runs(slots)]  # fmt: skip
                        pages[ids] = parts[0] if len(parts) == 1 else torch.cat(parts)

    def reset(self) -> None:
        """Forget every saved block (the prefix cache was reset: weights changed, sleep)."""
        self.slots.clear()
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self.pending.clear()


def _batches(ops: list[tuple[bool, int, int]]):
    """The queued copies in order as (save?, device blocks, host slots) batches: a run of one
    kind that touches each slot and each block once (a second copy to either starts the next
    batch: a scatter to one block twice has no order on the GPU)."""
    batch, kind, seen = ([], []), None, set()
    for save, block_id, slot in ops:
        if save is not kind or ("s", slot) in seen or ("b", block_id) in seen:
            if batch[0]:
                yield kind, *batch
            batch, kind, seen = ([], []), save, set()
        batch[0].append(block_id)
        batch[1].append(slot)
        seen.update((("s", slot), ("b", block_id)))
    if batch[0]:
        yield kind, *batch


def _runs(slots: list[int]):
    """(i, j, first slot) of each run of consecutive slots in `slots[i:j]`."""
    i = 0
    for j in range(1, len(slots) + 1):
        if j == len(slots) or slots[j] != slots[j - 1] + 1:
            yield i, j, slots[i]
            i = j


def check_offload_options(size: float | None, backend: str | None) -> None:
    """`kv_offloading_size` / `kv_offloading_backend` as given (EngineConfig's check)."""
    from polymodal.llm_core.errors import InvalidInputError

    if backend not in (None, "native"):
        raise InvalidInputError(
            f"kv_offloading_backend={backend!r}: only 'native' (host memory under the prefix "
            "cache) is supported"
        )
    if size is not None and (isinstance(size, bool) or not size > 0):
        raise InvalidInputError(f"kv_offloading_size must be > 0 GiB, got {size!r}")
    if backend is not None and size is None:
        raise InvalidInputError(
            f"kv_offloading_backend={backend!r} needs kv_offloading_size (GiB of host memory)"
        )


def build_host_tier(cfg, layout, runner, prefix_caching: bool) -> HostKVTier | None:
    """The engine's host tier (`cfg.kv_offloading_size` GiB), or None without one;
    `prefix_caching`: whether the engine caches prefixes (not for pooling models). Refuses
    what it does not do, naming it."""
    from polymodal.llm_core.errors import InvalidInputError
    from polymodal.llm_core.kv_cache_spec import FULL

    if not cfg.kv_offloading_size:
        return None
    why = None
    if not prefix_caching:
        why = "it extends the prefix cache, which is off (enable_prefix_caching=False, or a "
        why += "pooling model)"
    elif layout.num_groups != 1 or layout.groups[0].spec.kind != FULL:
        kinds = sorted({g.spec.kind for g in layout.groups})
        why = f"the model's KV cache has {kinds} layers; only one full-attention group is done"
    elif runner.executor is not None:
        why = "tensor_parallel_size > 1 is not supported"
    if why is not None:
        raise InvalidInputError(f"kv_offloading_size: {why}")
    draft = runner.draft.kv_caches if runner.draft is not None else []
    tensors, seen = [], set()
    for t in [*runner.kv_caches, *draft]:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return HostKVTier(tensors, HostKVTier.blocks_for(cfg.kv_offloading_size, tensors))
