"""Mixture of experts: the router, the stacked experts and the sparse block around them.

- `route` picks each token's `top_k` experts and their weights: softmax top-k with or without
  renormalisation (Mixtral, Qwen3-MoE), or DeepSeek-V3's sigmoid scores + a correction bias
  (used for the choice only) + grouped top-k (`num_groups` groups ranked by the sum of their two
  best scores, experts chosen from the best `topk_groups`), times `scaling`.
- `FusedMoE` holds every expert's weights stacked, `gate_up_proj [E, 2 * I, H]` (`[gate | up]`
  rows) and `down_proj [E, H, I]` (transformers v5's in-memory layout), loaded from per-expert
  checkpoint tensors by the model's `expert_modules_mapping`. Its `ExpertsMethod` owns the
  weights and the product (the seam quantized experts plug into, like `LinearMethod`):
  unquantized, the Triton kernels on CUDA (`triton_moe.fused_experts`: tokens sorted and padded
  by expert, gate_up and down as grouped GEMMs, SiLU*mul and the routing weight in their
  epilogues; one token: a GEMV per chosen expert that reads only those experts' weights) and
  the dense per-expert loop of transformers elsewhere (the CPU reference).
- `SparseMoeBlock`: router (`gate`), experts and optional shared experts, HF's names. Where
  `enable_moe_decode` set it (CUDA, half/bf16, unquantized; softmax or DeepSeek-V3's grouped
  sigmoid router; shared experts an unsharded SwiGLU `MLP`), up to `DECODE_MAX_TOKENS` rows take
  `moe_decode` instead: routing in one launch, routed and shared experts together in two, a
  deferred RMSNorm of x applied as it loads and the residual add in the last epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.linear import Linear, UnquantizedLinearMethod
from polymodal.llm_core.layers.norm import DeferredNorm

# Per-expert checkpoint tensors -> (stacked parameter, shard): HF's gate/up/down names and
# Mixtral's w1 (gate) / w3 (up) / w2 (down). A model's `expert_modules_mapping`.
# Rows up to this count take `moe_decode` in blocks `enable_moe_decode` set (decode steps).
# H200, `scripts/bench_moe.py --only decode` (block us, unfused / moe_decode): Qwen3-30B-A3B
# 62 / 35 at 1 row, 129 / 59 at 2, 163 / 155 at 4, 206 / 397 at 8; Mixtral 235 / 211 at 1,
# 461 / 434 at 2, 522 / 835 at 4: the fused path wins up to 2 rows.
DECODE_MAX_TOKENS = 2
# Those decode blocks as one persistent launch (`moe_layer`: routing, gate_up and down with
# waits inside the launch) instead of `moe_decode`'s three; off: bit-identical but slower on an
# H100 (46.5 vs 36.6 us a layer, s49a); more programs an SM untimed (scripts/device/s49c.sh).
ONE_LAUNCH_DECODE = False
HALF_DTYPES = (torch.float16, torch.bfloat16)

HF_EXPERT_MAPPING = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
    "w1": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "w2": ("down_proj", 0),
}


@dataclass(frozen=True)
class RouterConfig:
    """How a router turns logits `[T, E]` into `top_k` experts per token.

    `scoring`: "softmax" (probabilities over all experts) or "sigmoid" (DeepSeek-V3: independent
    scores; a correction bias shifts the choice, not the weights). `renormalize`: the chosen
    weights are divided by their sum. `num_groups` / `topk_groups`: experts split into groups,
    tokens choose only from the `topk_groups` best groups (ranked by their two best scores).
    `scaling`: the final weights are multiplied by it (`routed_scaling_factor`).
    """

    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be softmax or sigmoid, got {self.scoring!r}")


def route(
    logits: torch.Tensor, cfg: RouterConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 `[T, top_k]`, expert ids int64 `[T, top_k]`) for router `logits [T, E]`."""
    if cfg.scoring == "softmax":
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * cfg.scaling if cfg.scaling != 1.0 else weights, ids
    scores = logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, cfg.num_groups, num_experts // cfg.num_groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, groups]
        best = torch.topk(group_scores, cfg.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.scaling, ids


class Router(nn.Module):
    """The gate: `weight [E, H]` (HF `...gate.weight`), DeepSeek's fp32
    `e_score_correction_bias [E]` when `correction_bias`; logits in fp32 when `fp32_logits`
    (DeepSeek-V3), else in the model dtype (Mixtral, Qwen3-MoE)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        cfg: RouterConfig,
        correction_bias: bool = False,
        fp32_logits: bool = False,
    ):
        super().__init__()
        self.cfg, self.fp32_logits = cfg, fp32_logits
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32)) if correction_bias else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        return route(logits, self.cfg, self.e_score_correction_bias)


class ExpertsMethod:
    """How a `FusedMoE` holds its experts' weights and computes their weighted sum."""

    def create_weights(self, layer: FusedMoE) -> None:
        """Register the stacked parameters, each with a `weight_loader(param, tensor,
        (expert, shard))` and its `shard_ids`."""
        raise NotImplementedError

    def apply(self, layer: FusedMoE, x, weights, ids) -> torch.Tensor:
        """`sum_j weights[t, j] * expert_{ids[t, j]}(x[t])` for every token: `[T, H]`."""
        raise NotImplementedError


class UnquantizedExpertsMethod(ExpertsMethod):
    """Experts in the model dtype: the Triton kernels on CUDA, the dense loop elsewhere."""

    def create_weights(self, layer: FusedMoE) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        layer.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        layer.down_proj = nn.Parameter(torch.empty(e, h, i))
        nn.init.normal_(layer.gate_up_proj, std=h**-0.5)
        nn.init.normal_(layer.down_proj, std=i**-0.5)
        for param, shards in ((layer.gate_up_proj, (0, 1)), (layer.down_proj, (0,))):
            param.weight_loader = layer.load_expert_shard
            param.shard_ids = [(expert, s) for expert in range(e) for s in shards]

    def apply(self, layer: FusedMoE, x, weights, ids) -> torch.Tensor:
        if x.is_cuda and fused_ops() is not None:
            from polymodal.llm_core.layers.triton_moe import fused_experts

            return fused_experts(x, layer.gate_up_proj, layer.down_proj, weights, ids)
        return experts_reference(x, layer.gate_up_proj, layer.down_proj, weights, ids)


UNQUANTIZED_EXPERTS = UnquantizedExpertsMethod()


class FusedMoE(nn.Module):
    """`num_experts` SwiGLU experts with stacked weights (see the module docstring)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        method: ExpertsMethod | None = None,
    ):
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.method = method or UNQUANTIZED_EXPERTS
        self.method.create_weights(self)

    def load_expert_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        """Copy one expert's projection (`shard_id = (expert, shard)`: shard 0 = gate or down,
        1 = up) into the stacked parameter; `None`: the whole stacked tensor."""
        if shard_id is None:
            target = param.data
        else:
            expert, shard = shard_id
            rows = param.shape[1] // (2 if param is self.gate_up_proj else 1)
            target = param.data[expert].narrow(0, shard * rows, rows)
        if target.shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x `[T, H]`, weights fp32 / ids `[T, top_k]` from `route` -> `[T, H]`."""
        return self.method.apply(self, x, weights, ids)

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what a token that chooses it makes a step read)."""
        return sum(p.numel() * p.element_size() for p in self.parameters()) // self.num_experts

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, method={type(self.method).__name__}"
        )


def experts_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """The dense per-expert loop (transformers' own): each expert that any token chose runs
    on its tokens; outputs are weighted and summed in expert order. `[T, H]` in x's dtype."""
    out = torch.zeros_like(x)
    hit = torch.zeros(gate_up.shape[0], dtype=torch.bool, device=x.device)
    hit[ids.flatten()] = True
    for expert in hit.nonzero().flatten().tolist():
        token, slot = torch.where(ids == expert)
        h = silu_and_mul(F.linear(x[token], gate_up[expert]))
        h = F.linear(h, down[expert]) * weights[token, slot, None]
        out.index_add_(0, token, h.to(x.dtype))
    return out


class SparseMoeBlock(nn.Module):
    """`experts(x, *gate(x)) (+ shared_experts(x))`: HF's `mlp` / `block_sparse_moe` module
    (`gate.weight`, `experts.<e>.*`, `shared_experts.*`)."""

    fused_decode = False  # few rows take `moe_decode` (set by `enable_moe_decode`)

    def __init__(self, gate: Router, experts: FusedMoE, shared_experts: nn.Module | None = None):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.shared_experts = shared_experts

    @property
    def top_k(self) -> int:
        """Experts each token runs."""
        return self.gate.cfg.top_k

    def fused_decode_fits(self) -> bool:
        """Whether `moe_decode` computes this block: unquantized half/bf16 experts on CUDA, a
        router in their dtype (softmax, or sigmoid with groups that `moe_route` takes), shared
        experts (if any) an unsharded, unquantized SwiGLU MLP of a multiple of I features."""
        if not isinstance(self.experts.method, UnquantizedExpertsMethod):
            return False
        weight = self.experts.gate_up_proj
        if not (weight.is_cuda and weight.dtype in HALF_DTYPES):
            return False
        if self.gate.weight.dtype != weight.dtype or self._decode_router_args() is None:
            return False
        return self.shared_experts is None or self._decode_shared_weights() is not None

    def _decode_router_args(self) -> dict | None:
        """`moe_decode.route`'s keywords for this router; None where it cannot compute it."""
        cfg, num_experts = self.gate.cfg, self.experts.num_experts
        if cfg.scoring == "softmax":  # the torch router has no groups or bias for softmax
            if self.gate.fp32_logits or self.gate.e_score_correction_bias is not None:
                return None
            return {"shared_experts": self._num_shared()}
        groups = cfg.num_groups
        size = num_experts // groups
        if groups > 1 and (size * groups != num_experts or size < 2):
            return None  # (torch's router needs the same)
        if cfg.top_k > (size * cfg.topk_groups if groups > 1 else num_experts):
            return None
        return {
            "scoring": "sigmoid",
            "fp32_logits": self.gate.fp32_logits,
            "correction_bias": self.gate.e_score_correction_bias,
            "num_groups": groups,
            "topk_groups": cfg.topk_groups if groups > 1 else 1,
            "shared_experts": self._num_shared(),
        }

    def _num_shared(self) -> int:
        """How many routed-size experts the shared MLP splits into (0 without one)."""
        if self.shared_experts is None:
            return 0
        return self.shared_experts.down_proj.in_features // self.experts.intermediate_size

    def _decode_shared_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The shared MLP's `(gate_up [2 * S * I, H], down [H, S * I])` for `moe_decode`, or
        None where it is not a plain SwiGLU `MLP` of S * I features (sharded, quantized, with a
        bias, another module)."""
        shared, inter = self.shared_experts, self.experts.intermediate_size
        children = dict(shared.named_children())
        if set(children) != {"gate_up_proj", "down_proj"}:
            return None
        linears = list(children.values())
        plain = all(
            isinstance(lin, Linear) and type(lin.method) is UnquantizedLinearMethod
            and lin.parallel is None and not lin.has_bias and not list(lin.children())
            and lin.weight.dtype == self.experts.gate_up_proj.dtype and lin.weight.is_contiguous()
            for lin in linears
        )  # fmt: skip
        gate_up, down = children["gate_up_proj"].weight, children["down_proj"].weight
        count = down.shape[1] // inter if plain else 0
        if count < 1 or down.shape[1] != count * inter or gate_up.shape[0] != 2 * count * inter:
            return None
        return gate_up, down

    def forward(self, x, residual: torch.Tensor | None = None):
        """x: `[T, H]` or a `DeferredNorm`. `fused_decode` and T <= `DECODE_MAX_TOKENS`:
        `moe_decode` normalizes x as it loads it and, given `residual`, adds it and returns an
        `AddedResidual` (as `Linear.fused` does). Otherwise x is normalized first and the plain
        output comes back (the caller adds `residual`)."""
        rows = x.h if isinstance(x, DeferredNorm) else x
        if self.fused_decode and rows.shape[0] <= DECODE_MAX_TOKENS:
            from polymodal.llm_core.layers import moe_decode

            cfg, router = self.gate.cfg, self._decode_router_args()
            gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
            shared = None if self.shared_experts is None else self._decode_shared_weights()
            if ONE_LAUNCH_DECODE:
                from polymodal.llm_core.layers.moe_layer import moe_layer

                del router["shared_experts"]  # (`shared` names them)
                return moe_layer(x, self.gate.weight, gate_up, down, cfg.top_k, cfg.renormalize,
                                 cfg.scaling, residual, shared=shared, **router)[0]  # fmt: skip
            weights, ids = moe_decode.route(x, self.gate.weight, cfg.top_k, cfg.renormalize,
                                            cfg.scaling, **router)  # fmt: skip
            return moe_decode.experts(x, gate_up, down, weights, ids, residual, shared=shared)
        if isinstance(x, DeferredNorm):
            x = x.materialize()
        out = self.experts(x, *self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def enable_moe_decode(model: nn.Module) -> int:
    """Let few-row calls of the `SparseMoeBlock`s of `model` that `moe_decode` computes take it
    (`EngineConfig.decode_gemv`, before graph capture). Returns how many blocks it set."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock) and m.fused_decode_fits()]
    if not blocks or fused_ops() is None:  # no Triton
        return 0
    for block in blocks:
        block.fused_decode = True
    return len(blocks)
