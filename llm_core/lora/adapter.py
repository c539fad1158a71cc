"""LoRA adapters from PEFT directories: `LoRARequest` (vLLM's spelling) and the loader.

A PEFT LoRA directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
`use_rslora`, `rank_pattern`, `alpha_pattern`, ...) and `adapter_model.safetensors` (or
`adapter_model.bin`) with, per adapted module, `base_model.model.<module>.lora_A.weight`
`[r, in]` and `...lora_B.weight` `[out, r]`. The module's output becomes
`W x + scaling * B (A x)` with `scaling = lora_alpha / r` (`/ sqrt(r)` with rsLoRA).

Module names are the checkpoint's; the model's own tables (`weight_name_remap`,
`packed_modules_mapping`) map them onto our layers, so `q_proj` lands in its slice of the packed
`qkv_proj`. What we cannot serve is refused when the adapter is loaded, naming it: a rank above
`max_lora_rank`, a module the model lacks, DoRA, trained biases, `modules_to_save`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.weights import resolve_name

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # PEFT may name the adapter


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter for a request, as vLLM spells it: `LoRARequest(name, int_id, path)`.

    `lora_int_id` (>= 1) identifies the adapter: requests with the same id share its loaded
    weights, its slot and its prefix-cache entries. `lora_path` is a PEFT adapter directory.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise InvalidInputError(f"LoRARequest {self.lora_name!r}: lora_int_id must be an int")
        if self.lora_int_id < 1:
            raise InvalidInputError(
                f"LoRARequest {self.lora_name!r}: lora_int_id must be >= 1, got {self.lora_int_id}"
            )
        if not self.lora_path:
            raise InvalidInputError(f"LoRARequest {self.lora_name!r}: lora_path is empty")

    @property
    def cache_key(self) -> tuple:
        """What the prefix cache and the slots know the adapter by."""
        return ("lora", self.lora_int_id, str(self.lora_path))


@dataclass
class LoRAAdapter:
    """A loaded adapter: per target layer (our module name) and slice (shard id, None for an
    unpacked layer), `(A [r, in], B [out_slice, r] * scaling)` in float32 on the CPU."""

    request: LoRARequest
    rank: int
    weights: dict[str, dict[object, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / "adapter_model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(str(file))
    file = path / "adapter_model.bin"
    if file.is_file():
        return torch.load(str(file), map_location="cpu", weights_only=True)
    raise FileNotFoundError("no adapter_model.safetensors (or adapter_model.bin)")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern`: the value of the first key matching the module
    name's end (PEFT matches `(.*\\.)?key$`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(
    request: LoRARequest,
    layers: dict[str, object],
    packed: dict,
    remap: list,
    max_rank: int,
) -> LoRAAdapter:
    """Read and check a PEFT adapter for a model whose LoRA-capable layers are `layers`
    (module name -> `Linear`); raises `InvalidInputError` naming the adapter and the problem."""
    name = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    path = Path(request.lora_path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = _read_tensors(path)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{name}: cannot read the adapter directory: {exc}") from None
    return adapter_from_tensors(request, config, tensors, layers, packed, remap, max_rank)


def adapter_from_tensors(
    request: LoRARequest,
    config: dict,
    tensors: dict[str, torch.Tensor],
    layers: dict[str, object],
    packed: dict,
    remap: list,
    max_rank: int,
) -> LoRAAdapter:
    """Check and build an adapter from a PEFT `config` dict and its `tensors`
    (`<module>.lora_{A,B}[.<name>].weight`, PEFT's prefix optional): what `load_adapter` does
    once the directory is read; models with adapters inside their checkpoint call it too."""
    name = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidInputError(f"{name}: peft_type {peft_type!r} is not LoRA")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(key):
            raise InvalidInputError(f"{name}: {key}=true is not supported")
    if config.get("alora_invocation_tokens"):
        raise InvalidInputError(f"{name}: activated LoRA (alora_invocation_tokens) unsupported")
    if config.get("bias", "none") != "none":
        raise InvalidInputError(f"{name}: trained biases (bias={config['bias']!r}) unsupported")
    if config.get("modules_to_save"):
        raise InvalidInputError(
            f"{name}: modules_to_save {config['modules_to_save']} (fully trained modules) "
            "are not supported"
        )
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    _check_targets(name, config.get("target_modules"), layers, packed)

    params = {f"{module}.weight" for module in layers}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.match(key)
        if found is None:
            raise InvalidInputError(f"{name}: unexpected tensor {key!r} (only lora_A/lora_B)")
        module = found.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[found.group(2)] = tensor
    adapter = LoRAAdapter(request, rank)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise InvalidInputError(f"{name}: module {module!r} lacks lora_{'AB'[('A' in pair)]}")
        _, target, shard = resolve_name(f"{module}.weight", params, packed, remap)
        layer_name = target.removesuffix(".weight")
        layer = layers.get(layer_name)
        if layer is None:
            raise InvalidInputError(
                f"{name}: targets {module!r}, which this model lacks or serves without LoRA"
            )
        a, b = pair["A"].float(), pair["B"].float()
        r = _pattern_value(config.get("rank_pattern"), module, rank)
        lora_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        if a.shape[0] > max_rank:
            raise InvalidInputError(
                f"{name}: rank {a.shape[0]} of {module!r} exceeds max_lora_rank={max_rank}"
            )
        # (shard, offset in B's rows, size): one slice, or every slice of a packed layer the
        # checkpoint stores fused (Phi-3's qkv_proj): the same A, B cut by output rows
        slices = [(s, o if shard is None else 0, n) for s, o, n in layer.lora_slices()
                  if shard is None or s == shard]  # fmt: skip
        out_size = sum(n for _, _, n in slices)
        if a.shape != (a.shape[0], layer.in_features) or b.shape != (out_size, a.shape[0]):
            raise InvalidInputError(
                f"{name}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the model's layer needs [r, {layer.in_features}] and [{out_size}, r]"
            )
        scaling = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        for slice_id, offset, size in slices:
            scaled = b[offset : offset + size] * scaling
            adapter.weights.setdefault(layer_name, {})[slice_id] = (a, scaled)
    if not adapter.weights:
        raise InvalidInputError(f"{name}: the adapter holds no LoRA weights")
    ranks = [a.shape[0] for slices in adapter.weights.values() for a, _ in slices.values()]
    adapter.rank = max(ranks)
    return adapter


def _check_targets(name: str, targets, layers: dict, packed: dict) -> None:
    """Every module named in `target_modules` exists in the model (by its last name part)."""
    known = {module.rpartition(".")[2] for module in layers}
    known |= {shard for shard, (fused, _) in packed.items() if fused in known}
    if targets is None or isinstance(targets, str):  # a regex (or all-linear): tensors decide
        return
    missing = sorted(t for t in targets if t.rpartition(".")[2] not in known)
    if missing:
        raise InvalidInputError(
            f"{name}: target_modules {missing} are not LoRA-capable layers of this model "
            f"(it has {sorted(known)})"
        )
