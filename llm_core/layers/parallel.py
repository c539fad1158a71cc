"""Tensor-parallel shards of the decoder's layers, plugged in at the `Linear` seams.

A `Linear` built with a `parallel=` shard holds this rank's slice of the checkpoint tensor (its
loader narrows every tensor as it arrives) and runs its product through the shard's method:

    ColumnParallel   output features split (q/k/v by heads, gate/up): no communication; the
                     next layer reads this rank's features
    RowParallel      input features split (o, down): partial sums, all-reduced (the bias is
                     loaded on rank 0 only, so the sum adds it once)
    VocabParallel    the LM head's vocab rows split (padded to equal parts): logits gathered
                     on rank 0, where sampling runs
    VocabParallelEmbedding   the embedding's vocab rows split: each rank looks up its own ids,
                     the rest are zero rows, then an all-reduce

The helpers `column` / `row` / `vocab` / `vocab_embedding` return None (or a plain
`nn.Embedding`) for one rank, so a model built without tensor parallelism is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers.linear import LinearMethod
from polymodal.llm_core.tensor_parallel import TPGroup


class ColumnParallel:
    """This rank's output rows: `starts[shard_id]` is where its slice begins in the checkpoint
    tensor of each shard (None: an unpacked layer), `full_sizes` the checkpoint's rows of each
    (a packed layer stored fused in the checkpoint is cut into them first)."""

    def __init__(self, tp: TPGroup, starts: dict, full_sizes: dict):
        self.tp, self.starts, self.full_sizes = tp, starts, full_sizes

    def wrap(self, method: LinearMethod) -> LinearMethod:
        return method

    def narrow(self, layer, param, tensor: torch.Tensor, shard_id) -> torch.Tensor:
        dim = getattr(param, "output_dim", 0)
        if dim is None:
            return tensor
        offsets = getattr(layer, "shard_offsets", None)
        if shard_id is None and offsets:  # the checkpoint stores the fused tensor (Phi-3)
            parts = tensor.split(list(self.full_sizes.values()), dim)
            return torch.cat(
                [self._slice(layer, p, s, dim) for p, s in zip(parts, self.full_sizes)], dim
            )
        return self._slice(layer, tensor, shard_id, dim)

    def _slice(self, layer, tensor: torch.Tensor, shard_id, dim: int) -> torch.Tensor:
        offsets = getattr(layer, "shard_offsets", None)
        size = offsets[shard_id][1] if offsets else layer.out_features
        return tensor.narrow(dim, self.starts[shard_id], size)


class RowParallel:
    """This rank's input features `[start, start + layer.in_features)`; output all-reduced."""

    def __init__(self, tp: TPGroup, start: int):
        self.tp, self.start = tp, start

    def wrap(self, method: LinearMethod) -> LinearMethod:
        return AllReduceMethod(method, self.tp)

    def narrow(self, layer, param, tensor: torch.Tensor, shard_id) -> torch.Tensor:
        if tensor.dim() == 1:  # the bias: added once, by rank 0's share of the sum
            return tensor if self.tp.rank == 0 else torch.zeros_like(tensor)
        return tensor.narrow(1, self.start, layer.in_features)


class VocabParallel:
    """The LM head's rows `[start, start + per_rank)` of `vocab` (the last rank's tail padded
    with zero rows); logits gathered on rank 0 and cut back to `vocab`."""

    def __init__(self, tp: TPGroup, vocab: int):
        self.tp, self.vocab = tp, vocab
        self.per_rank = -(-vocab // tp.size)
        self.start = tp.rank * self.per_rank

    def wrap(self, method: LinearMethod) -> LinearMethod:
        return GatherMethod(method, self.tp, self.vocab)

    def narrow(self, layer, param, tensor: torch.Tensor, shard_id) -> torch.Tensor:
        return vocab_rows(tensor, self.start, self.per_rank)


class _WrappedMethod(LinearMethod):
    """A method around another one (which owns the weights and the product)."""

    supports_gemv = False  # the GEMV's folded residual add would come before the collective

    def __init__(self, inner: LinearMethod, tp: TPGroup):
        self.inner, self.tp = inner, tp

    def create_weights(self, layer, dtype=None, device=None) -> None:
        self.inner.create_weights(layer, dtype, device)

    def process_weights(self, layer) -> None:
        self.inner.process_weights(layer)

    def randomize(self, layer) -> bool:
        return self.inner.randomize(layer)


class AllReduceMethod(_WrappedMethod):
    """Row-parallel product: this rank's partial sum, then the all-reduce. A residual the call
    site offers is not folded: the caller adds it after the sum (`add_norm` takes either)."""

    def apply(self, layer, x, silu_mul: bool = False, residual=None):
        return self.tp.all_reduce(self.inner.apply(layer, x, silu_mul=silu_mul))


class GatherMethod(_WrappedMethod):
    """Vocab-parallel LM head: this rank's logits, gathered on rank 0 `[rows, vocab]`; other
    ranks get `[rows, 0]` (they sample nothing)."""

    def __init__(self, inner: LinearMethod, tp: TPGroup, vocab: int):
        super().__init__(inner, tp)
        self.vocab = vocab

    def apply(self, layer, x, silu_mul: bool = False, residual=None):
        logits = self.tp.gather_last_dim(self.inner.apply(layer, x, silu_mul=silu_mul))
        return logits[..., : self.vocab]


class VocabParallelEmbedding(nn.Module):
    """`nn.Embedding` with this rank's vocab rows (`weight [per_rank, hidden]`, HF's name)."""

    def __init__(self, vocab: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp, self.num_embeddings = tp, vocab
        self.per_rank = -(-vocab // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))
        nn.init.normal_(self.weight)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        rows = vocab_rows(tensor, self.start, self.per_rank)
        if rows.shape != param.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit the vocab-split embedding")
        param.data.copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        other = (local < 0) | (local >= self.per_rank)  # another rank's ids
        out = F.embedding(local.masked_fill(other, 0), self.weight)  # [num_tokens, hidden]
        return self.tp.all_reduce(out.masked_fill_(other.unsqueeze(-1), 0))


def vocab_rows(tensor: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows `[start, start + rows)` of `tensor`, zero-padded past its end."""
    part = tensor[start : start + rows]
    if part.shape[0] == rows:
        return part
    pad = part.new_zeros((rows - part.shape[0], *part.shape[1:]))
    return torch.cat([part, pad])


# ---- what model files call: None / plain modules for one rank ------------------------------
def column(tp: TPGroup, starts: dict, full_sizes: dict) -> ColumnParallel | None:
    """A column shard (see `ColumnParallel`), or None for one rank."""
    return ColumnParallel(tp, starts, full_sizes) if tp.size > 1 else None


def row(tp: TPGroup, start: int) -> RowParallel | None:
    """A row shard (see `RowParallel`), or None for one rank."""
    return RowParallel(tp, start) if tp.size > 1 else None


def vocab(tp: TPGroup, vocab_size: int) -> VocabParallel | None:
    """The LM head's vocab shard, or None for one rank."""
    return VocabParallel(tp, vocab_size) if tp.size > 1 else None


def vocab_embedding(vocab_size: int, hidden: int, tp: TPGroup) -> nn.Module:
    """`nn.Embedding` for one rank, else its vocab-parallel form."""
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden)
    return VocabParallelEmbedding(vocab_size, hidden, tp)


def local_vocab(vocab_size: int, tp: TPGroup) -> int:
    """Rows of the LM head / embedding on each rank (the vocab split, padded)."""
    return -(-vocab_size // tp.size)
