"""LoRA at the `LinearMethod` seam: `LoRALinearMethod` wraps a layer's own method (dense,
FP8, INT4) and adds the adapters' low-rank products of the step's tokens; `LoRABatch` holds
which adapter slot each token of the step uses.

`LoRABatch` is the one piece of per-step state the layers read without it being passed down
the model's forward: like the KV caches, it is a set of static device buffers that the runner
refills before each forward (`set_step`), which is what lets a captured CUDA graph replay the
kernels with each step's adapter mapping. Each wrapped layer holds the stacked weights of every
slot (`lora_a [max_loras, S * R, in]`, `lora_b [max_loras, out, R]`, scaling folded into B,
rank zero-padded to `max_lora_rank`). A dense layer keeps `lora_a` in the rows right under its
weight (`fold_storage`), so one GEMM of the stacked weight gives the base product and every
slot's shrink: the few-thousand-element shrink of a decode step then costs a few more GEMM
columns instead of a latency-bound kernel per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.host_copy import upload
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.lora.ops import LoRASegments, lora_folded_reference, lora_reference


class LoRABatch:
    """Which adapter slot each token of the step uses (-1: none), as device segments for the
    kernels (`LoRASegments`) and host index groups for the torch path."""

    def __init__(self, max_loras: int, max_tokens: int, device: torch.device):
        self.max_loras = max_loras
        self.device = torch.device(device)
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
        token_slot = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)
        # segments: one per slot, then the tokens without an adapter (`triton_fold`): the
        # step's, then every row after them (identity), so a graph bucket's padding is in it
        order = torch.arange(max_tokens, dtype=torch.int32, device=self.device)
        self.segments = LoRASegments(
            order, zeros(max_loras + 1), zeros(max_loras + 1), token_slot, []
        )
        self.num_active = 0  # slots with tokens this step
        # kernels run whatever the step holds: set while the LoRA CUDA graphs are captured
        self.always_run = False
        self.use_triton = self.device.type == "cuda"
        self._rows = 0  # leading rows of `token_slot` / `sorted_tokens` the last upload wrote

    def set_step(self, slots_and_counts: list[tuple[int, int]]) -> None:
        """The step's requests in batch order as `(slot, num_tokens)`; slot -1: no adapter.

        A step without adapter tokens uploads nothing: its layers take their base method (its
        eager kernels, or the decode / prefill graphs captured without LoRA), and the device
        buffers are read only in steps that hold adapter tokens (or by `clear`'s capture)."""
        groups: dict[int, list[int]] = {}
        position = 0
        for slot, count in slots_and_counts:
            if slot >= 0:
                groups.setdefault(slot, []).extend(range(position, position + count))
            position += count
        seg = self.segments
        if position > seg.sorted_tokens.shape[0]:
            raise ValueError(f"{position} tokens exceed the LoRA batch's {seg.sorted_tokens.shape}")
        self.num_active = len(groups)
        seg.host_groups = [(slot, torch.tensor(groups[slot])) for slot in sorted(groups)]
        if not (self.use_triton and groups):
            return
        lengths = [len(groups.get(slot, ())) for slot in range(self.max_loras)]
        starts = [sum(lengths[:slot]) for slot in range(self.max_loras + 1)]
        lengths.append(position - starts[-1])  # the tokens without an adapter
        # each token's slot; rows the last upload set beyond this step's are reset: to -1,
        # and in the order to themselves (the no-adapter segment runs on to the grid's rows)
        token_slots = [slot for slot, count in slots_and_counts for _ in range(count)]
        tokens = [t for slot in sorted(groups) for t in groups[slot]]
        tokens += [t for t, slot in enumerate(token_slots) if slot < 0]
        tokens += range(position, self._rows)
        token_slots += [-1] * (self._rows - position)
        self._rows = position
        # one pinned asynchronous upload, then device copies into the static buffers
        lists = [lengths, starts, tokens, token_slots]
        lens, begins, order, owner = upload(lists, torch.int32, self.device)
        seg.seg_len.copy_(lens)
        seg.seg_start.copy_(begins)
        seg.sorted_tokens[: len(tokens)].copy_(order)
        seg.token_slot[: len(token_slots)].copy_(owner)

    def clear(self) -> None:
        """No token uses an adapter, on the host and in the device buffers (before a capture:
        the LoRA graphs record kernels that find no tokens)."""
        self.set_step([])
        seg = self.segments
        seg.seg_len.zero_()
        seg.seg_start.zero_()
        seg.token_slot.fill_(-1)
        torch.arange(seg.sorted_tokens.shape[0], out=seg.sorted_tokens)
        self._rows = 0


class LoRALinearMethod(LinearMethod):
    """The wrapped method's product, plus each token's adapter: `out += B A x` per slice.

    Steps without adapter tokens take the wrapped method as it is, fused work and all. With
    adapters (Triton kernels), the shrink reads x as the layer does (a `DeferredNorm` normalized
    and `silu_mul` applied as it loads), so the base product keeps those folds; the residual add
    must follow the delta (`out = (base + delta) + residual`, rounded in that order): a one-row
    GEMV adds the delta in its epilogue before the residual (every fold kept), any other method
    returns its plain product, `expand` adds the delta, and the caller adds the residual
    (`add_norm`). A dense layer's rows above the GEMV's (`folded`) take no shrink kernel:
    `F.linear(x, [W; A of every slot])` (x normalized / activated first, as the plain product
    takes it), then `triton_fold.expand_folded` adds each token's own slot's term and writes a
    contiguous `[T, out]`. The torch path (CPU) applies the fused work first, then the same
    math (`lora_folded_reference`; `lora_reference` for the other methods)."""

    def __init__(self, base: LinearMethod, batch: LoRABatch, layer: Linear, max_loras: int,
                 max_rank: int, dtype: torch.dtype):  # fmt: skip
        self.base = base
        self.batch = batch
        self.supports_gemv = base.supports_gemv
        offsets = getattr(layer, "shard_offsets", None) or {None: (0, layer.out_features)}
        self.shards = list(offsets)  # shard id per slice
        self.slices = [offsets[s] for s in self.shards]  # (out offset, out size)
        self.rank = max_rank
        device = next(p for p in layer.parameters()).device  # adapters in the model dtype
        num = len(self.slices)
        # dense layers (not a row shard: its all-reduce is the wrapper's) keep A under W
        self.folded = type(base) is UnquantizedLinearMethod and layer.weight.dtype == dtype
        if self.folded:
            lora_a = fold_storage(layer, max_loras * num * max_rank)
            lora_a = lora_a.view(max_loras, num * max_rank, layer.in_features)
        else:
            lora_a = torch.zeros(max_loras, num * max_rank, layer.in_features, dtype=dtype,
                                 device=device)  # fmt: skip
        layer.register_buffer("lora_a", lora_a, persistent=False)
        layer.register_buffer(
            "lora_b",
            torch.zeros(max_loras, layer.out_features, max_rank, dtype=dtype, device=device),
            persistent=False,
        )
        slice_offsets = [o for o, _ in self.slices]
        slice_sizes = [s for _, s in self.slices]
        self.slice_offsets = torch.tensor(slice_offsets, dtype=torch.int32, device=device)
        self.slice_sizes = torch.tensor(slice_sizes, dtype=torch.int32, device=device)
        self.max_slice = max(slice_sizes)

    def slice_table(self) -> list[tuple[object, int, int]]:
        """`(shard id, out offset, out size)` of each slice (shard None: an unpacked layer)."""
        return [(shard, *where) for shard, where in zip(self.shards, self.slices)]

    def create_weights(self, layer: Linear, dtype=None, device=None) -> None:
        self.base.create_weights(layer, dtype, device)

    def process_weights(self, layer: Linear) -> None:
        self.base.process_weights(layer)

    def set_slot(self, layer: Linear, slot: int, slices: dict | None) -> None:
        """Write an adapter's `{shard: (A [r, in], B [out_slice, r])}` into `slot` (zeros for
        slices it leaves alone; `slices=None` clears the slot)."""
        a_all, b_all, rank = layer.lora_a[slot], layer.lora_b[slot], self.rank
        a_all.zero_()
        b_all.zero_()
        for index, shard in enumerate(self.shards):
            if not slices or shard not in slices:
                continue
            a, b = slices[shard]
            offset, size = self.slices[index]
            r = a.shape[0]
            a_all[index * rank : index * rank + r].copy_(a)
            b_all[offset : offset + size, :r].copy_(b)

    def apply(self, layer: Linear, x, silu_mul: bool = False, residual=None):
        batch = self.batch
        if not batch.num_active and not batch.always_run:
            return self.base.apply(layer, x, silu_mul=silu_mul, residual=residual)
        seg = batch.segments
        if not batch.use_triton:
            x = _plain_input(x, silu_mul)
            groups = seg.host_groups
            if self.folded:
                stacked = F.linear(x, layer.folded_weight, layer.folded_bias)
                return lora_folded_reference(stacked, layer.out_features, layer.lora_b,
                                             self.slices, self.rank, groups)  # fmt: skip
            out = self.base.apply(layer, x)  # [num_tokens, out]
            return lora_reference(x, out, layer.lora_a, layer.lora_b, self.slices, self.rank,
                                  groups)  # fmt: skip
        from polymodal.llm_core.layers.gemv_lora import LoRADelta  # Triton: an optional dependency
        from polymodal.llm_core.lora import triton_fold, triton_lora

        gemv = isinstance(self.base, UnquantizedLinearMethod) and self.base.uses_gemv(layer, x)
        if self.folded and not gemv:  # the shrink inside the base GEMM, then the expand
            stacked = F.linear(_plain_input(x, silu_mul), layer.folded_weight, layer.folded_bias)
            return triton_fold.expand_folded(
                stacked, layer.lora_b, layer.out_features, self.slice_offsets, self.slice_sizes,
                self.max_slice, self.rank, seg,
            )  # fmt: skip
        y = triton_lora.shrink(x, layer.lora_a, seg, silu_mul)  # fp32 [num_tokens, S * R]
        if gemv:
            delta = LoRADelta(y, layer.lora_b, seg.token_slot, self.slice_offsets)
            return layer.gemv(x, layer.weight, layer.bias, silu_mul=silu_mul, residual=residual,
                              lora=delta)  # fmt: skip
        out = self.base.apply(layer, x, silu_mul=silu_mul)  # plain: the residual comes after
        triton_lora.expand(y, layer.lora_b, out, self.slice_offsets, self.slice_sizes,
                           self.max_slice, self.rank, seg)  # fmt: skip
        return out


def _plain_input(x, silu_mul: bool) -> torch.Tensor:
    """x as a plain product takes it: a `DeferredNorm` normalized, `[gate | up]` activated."""
    if isinstance(x, DeferredNorm):
        x = x.materialize()
    return silu_and_mul(x) if silu_mul else x


def fold_storage(layer: Linear, extra_rows: int) -> torch.Tensor:
    """Move a dense layer's weight (and bias) into storage `extra_rows` rows longer: the
    parameters become views of its first `out_features` rows (contiguous: the GEMV, the plain
    product and weight loading see what they saw), `layer.folded_weight` / `folded_bias` the
    whole (the tail zero: bias 0 for the LoRA columns). Returns the tail rows `[extra, in]`."""
    out = layer.out_features
    for name in ("weight", "bias"):
        old = getattr(layer, name)
        if old is None:
            setattr(layer, f"folded_{name}", None)
            continue
        whole = old.new_zeros(out + extra_rows, *old.shape[1:])
        whole[:out].copy_(old.detach())
        param = nn.Parameter(whole[:out], requires_grad=old.requires_grad)
        param.__dict__.update(old.__dict__)  # loader hooks, output_dim and the like
        setattr(layer, name, param)
        setattr(layer, f"folded_{name}", whole)
    return layer.folded_weight[out:]


def lora_layers(model: torch.nn.Module) -> dict[str, Linear]:
    """The model's layers that take adapters: every decoder `Linear` but the LM head (vision
    towers are built from `nn.Linear` and stay without)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Linear) and name.rpartition(".")[2] != "lm_head"
    }


def wrap_model(
    model: torch.nn.Module, batch: LoRABatch, max_loras: int, max_rank: int, dtype: torch.dtype
) -> dict:
    """Give every LoRA-capable layer a `LoRALinearMethod` (its loaded weights are kept);
    returns module name -> layer (each with `lora_slices()`: its slices' shard, offset, size)."""
    layers = lora_layers(model)
    for layer in layers.values():
        method = LoRALinearMethod(layer.method, batch, layer, max_loras, max_rank, dtype)
        layer.method = method
        layer.lora_slices = method.slice_table
        if method.folded and layer.weight.is_cuda:
            # the old weight's segment back to the device, so the next layer's (longer) storage
            # reuses it: cached, it could only hold smaller tensors, and stay reserved
            torch.cuda.empty_cache()
    return layers
