"""Linear layers whose checkpoint tensors are stored apart but run as one matmul."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """`nn.Linear` whose output rows stack several checkpoint projections (q/k/v, gate/up).

    `shard_sizes` maps a shard id (as in the model's `packed_modules_mapping`) to its rows.
    A checkpoint that already stores the fused tensor loads it whole.
    """

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool, dtype=None, device=None):
        super().__init__(in_features, sum(shard_sizes.values()), bias, dtype=dtype, device=device)
        offsets, start = {}, 0
        for shard_id, size in shard_sizes.items():
            offsets[shard_id] = (start, size)
            start += size
        self.shard_offsets = offsets
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard
                param.shard_ids = list(shard_sizes)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # already fused in the checkpoint (Phi-3)
            if param.shape != tensor.shape:
                raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(tensor)
            return
        start, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, start, size)
        if target.shape != tensor.shape:
            raise ValueError(
                f"shard {shard_id!r} shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}"
            )
        target.copy_(tensor)
