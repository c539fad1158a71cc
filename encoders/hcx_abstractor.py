"""HyperCLOVA X SEED Vision's projector: the C-Abstractor (Honeybee), in plain torch.

The published code builds it from timm: a learned position embedding added to the tower's
tokens (optional LayerNorm before it), then `nn.Sequential(s1, sampler, s2)` where s1 and s2
are timm `RegStage`s of `depth` (3) RegNet bottleneck blocks (stride 1, group size 1, SE ratio
0.25, SiLU, `LayerNorm2d`) and the sampler an `AdaptiveAvgPool2d` to `sqrt(num_queries)`
squared, then a readout MLP (Linear, then SiLU + Linear per extra depth). The adaptive pool
is applied with the query count each call asks for (video frames use a smaller one), so it is
a function here, not a module. Parameter names are timm's (`net.0.b1.conv1.conv.weight`,
`net.2.b3.se.fc2.bias`, `readout.2.weight`, `pos_emb`, `prenorm`), so the checkpoint's
`mm_projector.*` tensors load as they are. The test checks it against timm's `RegStage`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# timm's `LayerNormAct2d` default and `timm.layers.LayerNorm`'s (the optional prenorm)
BLOCK_NORM_EPS = 1e-5
PRENORM_EPS = 1e-6


class ConvNorm(nn.Module):
    """timm's `ConvNormAct` with `LayerNorm2d`: a bias-free conv, LayerNorm over channels,
    then SiLU unless `act` is False. Names: `conv.weight`, `bn.weight`, `bn.bias`."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, groups: int = 1, act=True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, padding=kernel // 2, groups=groups,
                              bias=False)  # fmt: skip
        self.bn = nn.LayerNorm(out_chs, eps=BLOCK_NORM_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [N, C, H, W]
        x = self.bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.silu(x) if self.act else x


class SqueezeExcite(nn.Module):
    """timm's `SEModule`: channel gates from the spatial mean (1x1 convs `fc1`, `fc2`)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))  # [N, C, 1, 1]
        return x * torch.sigmoid(gate)


class Bottleneck(nn.Module):
    """timm's RegNet `Bottleneck` as the abstractor configures it (bottleneck ratio 1, group
    size 1: the 3x3 conv is depthwise): 1x1, 3x3, SE, 1x1 (no activation), plus the shortcut
    (a 1x1 conv + norm when the width changes), then SiLU."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs, 1)
        self.conv2 = ConvNorm(out_chs, out_chs, 3, groups=out_chs)
        self.se = SqueezeExcite(out_chs, int(round(in_chs * 0.25)))
        self.conv3 = ConvNorm(out_chs, out_chs, 1, act=False)
        self.downsample = ConvNorm(in_chs, out_chs, 1, act=False) if in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(x + shortcut)


class RegStage(nn.Module):
    """`depth` bottlenecks `b1..b<depth>` (timm's `RegStage` names); the first changes width."""

    def __init__(self, depth: int, in_chs: int, out_chs: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class CAbstractor(nn.Module):
    """Tower tokens `[N, side^2, D]` -> `[N, queries, hidden]` per grid (one query count per
    call; `queries` a square)."""

    def __init__(
        self,
        num_input_tokens: int,
        encoder_hidden: int,
        hidden: int,
        output_hidden: int,
        pos_emb: bool = True,
        prenorm: bool = False,
        depth: int = 3,
        mlp_depth: int = 2,
    ) -> None:
        super().__init__()
        self.pos_emb = (
            nn.Parameter(torch.empty(1, num_input_tokens, encoder_hidden)) if pos_emb else None
        )
        self.prenorm = nn.LayerNorm(encoder_hidden, eps=PRENORM_EPS) if prenorm else None
        # index 1 is the adaptive pool (no parameters), kept so that s2 is `net.2`
        self.net = nn.Sequential(
            RegStage(depth, encoder_hidden, hidden), nn.Identity(), RegStage(depth, hidden, hidden)
        )
        readout: list[nn.Module] = [nn.Linear(hidden, output_hidden)]
        for _ in range(1, mlp_depth):
            readout += [nn.SiLU(), nn.Linear(output_hidden, output_hidden)]
        self.readout = nn.Sequential(*readout)

    def forward(self, x: torch.Tensor, num_queries: int) -> torch.Tensor:
        count, tokens, dim = x.shape
        side, out_side = math.isqrt(tokens), math.isqrt(num_queries)
        if side * side != tokens or out_side * out_side != num_queries:
            raise ValueError(f"C-Abstractor takes square grids: {tokens} -> {num_queries} tokens")
        if self.prenorm is not None:
            x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        x = x.transpose(1, 2).reshape(count, dim, side, side)  # [N, D, side, side]
        x = self.net[0](x)
        x = F.adaptive_avg_pool2d(x, out_side)  # [N, hidden, q, q]
        x = self.net[2](x)
        return self.readout(x.flatten(2).transpose(1, 2))  # [N, q * q, output_hidden]
