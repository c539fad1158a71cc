"""Residual streams of chosen decoder layers, kept at every forward of the target model (what
an EAGLE-3 head drafts from: eagle.py): forward pre-hooks store each stream in
`net.aux_states`; the decode and prefill graphs keep the tensors of their captured forward
(static outputs, rewritten by each replay) and hand out their rows like the hidden states."""

from __future__ import annotations

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.layers.norm import AddedResidual


def aux_hooks(net, layer_ids: list[int]) -> None:
    """Keep the residual streams entering `net`'s decoder layers `layer_ids` in
    `net.aux_states` (layer -> tensor) at every forward (EAGLE-3's features)."""
    layers = getattr(getattr(net, "model", None), "layers", None)
    if layers is None or not all(0 <= i < len(layers) for i in layer_ids):
        raise InvalidInputError(
            f"speculative_config eagle3: {type(net).__name__} has no decoder layers "
            f"{layer_ids} to read features from"
        )
    net.aux_states = {}

    def keep(index):
        def hook(module, args):
            hidden, residual = args[1], args[2]
            if isinstance(hidden, AddedResidual):
                stream = hidden.h.clone()
            else:
                stream = hidden.clone() if residual is None else hidden + residual
            net.aux_states[index] = stream

        return hook

    for i in layer_ids:
        layers[i].register_forward_pre_hook(keep(i))


def outputs_aux(net) -> list[torch.Tensor]:
    """The residual streams the last forward kept (`aux_hooks`), in layer order; [] without."""
    states = getattr(net, "aux_states", None) or {}
    return [states[i] for i in sorted(states)]
