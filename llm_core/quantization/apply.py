"""Building and loading a quantized model.

The model is built with its `Linear`s deferred (`deferred_weights`: meta tensors, nothing
allocated), then each gets its method by name (`assign_linear_methods`): for a pre-quantized
checkpoint the layers whose tensors the checkpoint stores quantized (its `markers`, read from
the safetensors headers), for an online scheme every decoder `Linear` but the LM head. The
checkpoint stream (`QuantizedStream`) passes the quantized layers' tensors through, turns the
quantized tensors of modules that run in 16 bits (a vision tower built with `nn.Linear`) back
into dense weights, drops static activation scales and collects KV-cache scales.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.layers.linear import UNQUANTIZED, Linear
from polymodal.llm_core.quantization.base import KV_SCALE, QuantScheme
from polymodal.llm_core.weights import resolve_name, safetensors_files


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    """Every tensor name in the checkpoint, from the safetensors headers (no tensor is read)."""
    names: list[str] = []
    for path in safetensors_files(model_dir):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{path}: unreadable safetensors header ({exc})") from exc
        names.extend(k for k in header if k != "__metadata__")
    return names


def _resolver(model: nn.Module):
    """checkpoint name -> (remapped name, target parameter name), by the model's tables."""
    params = {n for n, _ in model.named_parameters()}
    packed = getattr(model, "packed_modules_mapping", {})
    remap = getattr(model, "weight_name_remap", ())
    return lambda name: resolve_name(name, params, packed, remap)[:2]


def quantized_linear_names(model: nn.Module, scheme: QuantScheme, names: Iterable[str]) -> set:
    """Our `Linear` module names whose checkpoint tensors carry the scheme's markers."""
    resolve = _resolver(model)
    found = set()
    for name in names:
        module, _, suffix = name.rpartition(".")
        if suffix in scheme.markers:
            found.add(resolve(module + ".weight")[1].rpartition(".")[0])
    return found


def assign_linear_methods(model: nn.Module, scheme: QuantScheme, quantized: set | None) -> int:
    """Give every deferred `Linear` its method: the scheme's where it quantizes the layer
    (`quantized`: the checkpoint's quantized layers; None: the online rule), else unquantized.
    Returns the number of quantized layers."""
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or not layer.is_deferred:
            continue
        if quantized is None:
            quantize = name.rpartition(".")[2] != "lm_head" and not scheme.is_ignored(name)
        else:
            quantize = name in quantized
        try:
            layer.set_method(scheme.linear_method(layer) if quantize else UNQUANTIZED)
        except ValueError as exc:
            raise ModelLoadError(f"{scheme.describe()}: layer {name!r}: {exc}") from exc
        count += quantize
    return count


class QuantizedStream:
    """Wraps the checkpoint's `(name, tensor)` stream for a quantized model (see the module
    docstring). `kv_scales` collects `{attention prefix: {"k": float, "v": float}}`."""

    def __init__(self, model: nn.Module, scheme: QuantScheme | None):
        self.scheme = scheme
        self.resolve = _resolver(model)
        self.quantized = {n for n, m in model.named_modules() if _is_quantized(m)}
        self.kv_scales: dict[str, dict[str, float]] = {}

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator:
        scheme = self.scheme
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            kv = KV_SCALE.match(name)
            if kv is not None:
                kind = "k" if kv.group(2).startswith("k") else "v"
                self.kv_scales.setdefault(kv.group(1), {})[kind] = float(tensor.reshape(-1)[0])
                continue
            module, _, suffix = name.rpartition(".")
            if scheme is not None and suffix in scheme.skipped:
                continue
            if scheme is not None and scheme.owns(suffix, tensor):
                target = self.resolve(name)[1].rpartition(".")[0]
                if target not in self.quantized:  # runs in 16 bits: dequantize below
                    pending.setdefault(module, {})[suffix] = tensor
                    continue
            yield name, tensor
        for module, tensors in pending.items():
            try:
                weight = scheme.dequantize(tensors, module)
            except KeyError as exc:
                raise ModelLoadError(
                    f"quantized tensors {sorted(tensors)} of {module!r} without tensor "
                    f"'{module}.{exc.args[0]}' (missing from the checkpoint)"
                ) from exc
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"quantized module {module!r}: {exc}") from exc
            yield module + ".weight", weight

    def attention_scales(self, model: nn.Module) -> dict[AttentionLayer, tuple[float, float]]:
        """The collected KV scales by attention layer (a layer missing one gets 1.0)."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionLayer)]
        out = {}
        for prefix, scales in self.kv_scales.items():
            prefix = self.resolve(prefix + ".x")[0][:-2]  # the model's remap of the prefix
            for name, layer in layers:
                if name == prefix or name.startswith(prefix + "."):
                    out[layer] = (scales.get("k", 1.0), scales.get("v", 1.0))
                    break
        return out


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, Linear) and module.method is not UNQUANTIZED


@torch.no_grad()
def randomize_quantized(model: nn.Module) -> set:
    """Dummy weights of quantized layers (`LinearMethod.randomize`); returns the parameters
    set, which the generic random init then leaves alone."""
    done = set()
    for module in model.modules():
        if isinstance(module, Linear) and module.method.randomize(module):
            done.update(id(p) for p in module.parameters(recurse=False))
    return done
