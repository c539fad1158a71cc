"""Quantized inference: which scheme a checkpoint (or `quantization=`) asks for, and the
`LinearMethod`s that run it.

`resolve_quantization(raw_config, requested)` reads `quantization_config` from config.json
(pre-quantized checkpoints) or applies `quantization="fp8"` to a 16-bit one, and returns a
`QuantScheme` (or None: unquantized). The scheme gives each decoder `Linear` its method by
name (`apply.py` builds the model that way); its checkpoint tensors load into the method's
parameters through the usual loader.

Schemes, one table (`SCHEMES`, lazily imported):
  awq                 INT4 weight-only, AutoAWQ GEMM layout (`int4.py`)
  gptq                INT4 weight-only, GPTQ (desc_act false or true) (`int4.py`)
  fp8                 FP8 W8A8: online from 16 bits, or a checkpoint with `quant_method`
                      "fp8" (DeepSeek / Qwen3 block `weight_scale_inv`, per-tensor) (`fp8.py`)
  compressed-tensors  llm-compressor's `float-quantized` FP8 (channel / tensor / block)
  modelopt            NVIDIA ModelOpt FP8 (per-tensor weight scales)
"""

from __future__ import annotations

import importlib

from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.quantization.base import QuantScheme

# quant_method (as config.json spells it) -> "module:function(quantization_config)"
SCHEMES = {
    "awq": "polymodal.llm_core.quantization.int4:awq_scheme",
    "gptq": "polymodal.llm_core.quantization.int4:gptq_scheme",
    "fp8": "polymodal.llm_core.quantization.fp8:fp8_scheme",
    "compressed-tensors": "polymodal.llm_core.quantization.fp8:compressed_tensors_scheme",
    "modelopt": "polymodal.llm_core.quantization.fp8:modelopt_scheme",
}
# vLLM's names of the same schemes (its kernel choices are ours to make)
ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq", "fp8_e4m3": "fp8"}
# `quantization=` values that quantize a 16-bit checkpoint as it loads
ONLINE = ("fp8",)
# ... and with `dummy_weights` (benchmarks): random tensors in the scheme's format
DUMMY = ("fp8", "awq", "gptq")

__all__ = ["QuantScheme", "SCHEMES", "resolve_quantization"]


def _scheme(method: str, qc: dict, where: str) -> QuantScheme:
    module, _, fn = SCHEMES[method].partition(":")
    return getattr(importlib.import_module(module), fn)(qc, where)


def resolve_quantization(
    qc: dict | None, requested: str | None = None, dummy_weights: bool = False, where: str = ""
) -> QuantScheme | None:
    """The scheme to build the model with, or None for an unquantized model.

    `qc`: config.json's `quantization_config` (`ModelConfig.quantization_config`: how a
    pre-quantized checkpoint is stored; None for a 16-bit one). `requested`: the user's
    `quantization=` (None: whatever the checkpoint says). `where` names the config in errors.
    """
    if requested is not None:
        requested = ALIASES.get(requested, requested)
        if requested not in SCHEMES:
            raise InvalidInputError(
                f"quantization={requested!r} is not supported; choose from {sorted(SCHEMES)}"
            )
    if not qc:
        if requested is None:
            return None
        if requested in ONLINE or (dummy_weights and requested in DUMMY):
            return _scheme(requested, {"quant_method": requested, "online": True}, where)
        raise InvalidInputError(
            f"quantization={requested!r} needs a checkpoint quantized that way (config.json "
            f"'quantization_config'); {where or 'this checkpoint'} has none. A 16-bit "
            f"checkpoint is quantized on load only with {list(ONLINE)}"
        )
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    method = ALIASES.get(method, method)
    if method not in SCHEMES:
        raise ModelLoadError(
            f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
            f"supported; polymodal runs {sorted(SCHEMES)}"
        )
    if requested is not None and requested != method:
        raise InvalidInputError(
            f"quantization={requested!r} does not match the checkpoint, which is quantized "
            f"with {method!r} ({where}); leave quantization unset to use the checkpoint's"
        )
    return _scheme(method, qc, where)
