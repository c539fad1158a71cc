"""Medusa heads (vLLM's `{"method": "medusa", "model": DIR}`; Cai et al. 2024): extra decoding
heads over the target's last hidden state (after its final norm). Head i is a stack of residual
blocks `x + SiLU(W x + b)` and its own LM head; from the hidden state at position p (whose
target LM head gives the token at p + 1) head i predicts the token at p + 2 + i. vLLM drafts
each head's argmax (no tree); so does polymodal.

Checkpoints, as vLLM reads them:
- vLLM's layout: config.json `num_heads`, `num_hidden_layers` (blocks a head), `hidden_size`,
  `vocab_size`, `medusa_fc_bias`, optionally `original_lm_head` (one LM head shared by every
  head), `truncated_vocab_size` with a `token_map` tensor (the heads' rows are those ids of the
  target's vocabulary), `logit_scale`; tensors `blocks.{i}.layers.{j}.weight|bias`,
  `lm_heads.{i}.weight` (an optional `medusa_heads.` prefix);
- FasterDecoding's (the paper's release): config.json `medusa_num_heads`,
  `medusa_num_layers`; `medusa_lm_head.safetensors` / `.pt` with `{i}.{j}.linear.weight|bias`
  (biased blocks) and `{i}.{L}.weight` (head i's LM head after its L blocks).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlocks(nn.Module):
    """One head's blocks: `x + SiLU(layer(x))` for each of `layers`."""

    def __init__(self, hidden: int, count: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """`num_heads` heads of `num_layers` residual blocks and an LM head each (one shared when
    `shared_lm_head`) over `vocab` ids: the target's, or with `mapped` a subset of them (the
    checkpoint's `token_map`: the target id of each row)."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int, bias: bool,
                 shared_lm_head: bool = False, logit_scale: float = 1.0,
                 mapped: bool = False):  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlocks(hidden, num_layers, bias) for _ in range(num_heads)
        )
        count = 1 if shared_lm_head else num_heads
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, vocab, bias=False) for _ in range(count))
        self.num_heads = num_heads
        self.logit_scale = logit_scale
        self.mapped = mapped
        self.register_buffer("token_map", None)

    def forward(self, hidden: torch.Tensor, count: int) -> torch.Tensor:
        """The first `count` heads' greedy ids for each row of `hidden [B, hidden]`: `[count,
        B]` int64, in the target's vocabulary."""
        ids = []
        for i in range(count):
            x = self.blocks[i](hidden)
            logits = self.lm_heads[min(i, len(self.lm_heads) - 1)](x)
            ids.append((logits * self.logit_scale).argmax(-1))
        ids = torch.stack(ids)
        return ids if self.token_map is None else self.token_map[ids]

    def load_weights(self, tensors, source: str, fmt: str) -> None:
        """Every parameter from `tensors` (name -> tensor) in checkpoint format `fmt` ("vllm"
        or "medusa"); a missing or mis-shaped tensor raises naming it and `source`."""
        from polymodal.llm_core.errors import ModelLoadError

        layers = len(self.blocks[0].layers)
        params = dict(self.named_parameters())
        got = {}
        for name, tensor in tensors.items():
            name = name.removeprefix("medusa_heads.")
            if fmt == "medusa":
                m = re.fullmatch(r"(\d+)\.(\d+)\.(?:linear\.)?(weight|bias)", name)
                if m is None:
                    continue
                i, j, kind = int(m[1]), int(m[2]), m[3]
                name = f"blocks.{i}.layers.{j}.{kind}" if j < layers else f"lm_heads.{i}.{kind}"
            elif name == "lm_head.weight":
                name = "lm_heads.0.weight"
            if name == "token_map":
                if self.mapped:  # (a full vocabulary ignores it, as vLLM does)
                    device = self.lm_heads[0].weight.device
                    self.token_map = tensor.to(device=device, dtype=torch.int64)
            elif name in params:
                got[name] = tensor
        if self.mapped and self.token_map is None:
            raise ModelLoadError(
                f"{source}: truncated_vocab_size needs the checkpoint's 'token_map' tensor"
            )
        for name, param in params.items():
            tensor = got.get(name)
            if tensor is None:
                raise ModelLoadError(f"{source}: Medusa tensor {name!r} is missing")
            if self.token_map is not None and name.startswith("lm_heads."):
                if tensor.shape[0] > self.token_map.shape[0]:  # a full head: its mapped rows
                    tensor = tensor[self.token_map]
            if tensor.shape != param.shape:
                raise ModelLoadError(
                    f"{source}: Medusa tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
