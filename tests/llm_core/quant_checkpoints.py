"""Tiny pre-quantized checkpoints, written offline exactly as each format documents it (the
tools that make them, AutoAWQ / GPTQModel / llm-compressor, do not install or run on this CPU
machine): the decoder's linear layers of a tiny 16-bit checkpoint are quantized
round-to-nearest and packed in the format's layout, config.json gains the format's
`quantization_config`. Each writer also saves the dequantized weights as a 16-bit checkpoint:
the reference transformers runs (dequantize-then-fp32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polymodal.llm_core.quantization import int4_pack

# decoder linears that the tools quantize (the LM head, embeddings, norms and towers stay)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_decoder_linear(name: str) -> bool:
    parts = name.split(".")
    return (
        name.endswith(".weight")
        and len(parts) > 2
        and parts[-2] in LINEARS
        and "visual" not in name
        and "layers" in parts
    )


def _copy_checkpoint(src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _write(out: Path, tensors: dict, quantization_config: dict | None, dtype=None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    if dtype is not None:
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_int4_checkpoint(
    src: Path,
    out: Path,
    fmt: str,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = False,
    v2: bool = False,
    seed: int = 0,
) -> tuple[Path, Path]:
    """An AWQ (`fmt="awq"`) or GPTQ checkpoint of `src` in `out`, and its dequantized 16-bit
    twin in `out`-ref. Returns (quantized dir, reference dir)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = _copy_checkpoint(src, out)
    ref_dir = out.with_name(out.name + "-ref")
    ref = dict(_copy_checkpoint(src, ref_dir))
    orders: dict = {}  # layers that read the same input share GPTQ's act order (its Hessian)
    for name in [n for n in tensors if _is_decoder_linear(n)]:
        weight = tensors.pop(name)
        prefix = name[: -len(".weight")]
        k = weight.shape[1]
        g_idx = None
        if desc_act:
            reads = prefix.rpartition(".")[0] + ("o" if prefix.endswith("o_proj") else "")
            reads += "down" if prefix.endswith("down_proj") else ""
            if reads not in orders:
                orders[reads] = int4_pack.act_order_g_idx(k, group_size, gen)
            g_idx = orders[reads]
        q, zeros, scales = int4_pack.quantize_rtn(weight, group_size, g_idx, sym)
        if fmt == "awq":
            qweight, qzeros = int4_pack.pack_awq(q, zeros)
        else:
            qweight, qzeros = int4_pack.pack_gptq(q, zeros, v2)
            if g_idx is None:
                g_idx = torch.arange(k, dtype=torch.int32) // group_size
            tensors[prefix + ".g_idx"] = g_idx.clone()
        tensors[prefix + ".qweight"] = qweight
        tensors[prefix + ".qzeros"] = qzeros
        tensors[prefix + ".scales"] = scales
        ref[name] = int4_pack.dequantize(q, zeros, scales, g_idx).to(weight.dtype)
    if fmt == "awq":
        qc = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": ["visual"],
        }
    else:
        qc = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "checkpoint_format": "gptq_v2" if v2 else "gptq",
        }
    _write(out, tensors, qc, "float16")
    _write(ref_dir, ref, None)
    return out, ref_dir


def write_fp8_checkpoint(
    src: Path, out: Path, fmt: str, strategy: str = "channel", tower: bool = False
) -> Path:
    """An FP8 checkpoint of `src`'s decoder linears in `out`:
    `fmt="compressed-tensors"` (llm-compressor's float-quantized; `strategy` tensor / channel /
    block), `"fp8-block"` (DeepSeek-V3 / Qwen3: `weight_scale_inv`, `weight_block_size`) or
    `"modelopt"` (per-tensor `weight_scale` + a static `input_scale`, `quant_algo: FP8`).
    `tower=True` quantizes the vision tower's linear layers too (and ignores only lm_head)."""
    from polymodal.llm_core.quantization import fp8_ops

    if fmt == "fp8-block":
        strategy = "block"
    elif fmt == "modelopt":
        strategy = "tensor"
    tensors = _copy_checkpoint(src, out)
    scale_name = "weight_scale_inv" if fmt == "fp8-block" else "weight_scale"

    def quantized(name: str) -> bool:
        tower_linear = "visual" in name and name.endswith(".weight") and tensors[name].dim() == 2
        return _is_decoder_linear(name) or (tower and tower_linear)

    for name in [n for n in tensors if quantized(n)]:
        weight, scale = fp8_ops.quantize_weight(tensors[name], strategy)
        prefix = name[: -len(".weight")]
        tensors[name] = weight
        tensors[f"{prefix}.{scale_name}"] = scale.reshape(()) if fmt == "modelopt" else scale
        if fmt == "modelopt":
            tensors[f"{prefix}.input_scale"] = torch.tensor(0.05)
    if fmt == "compressed-tensors":
        block = [128, 128] if strategy == "block" else None
        act = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True}
        act["strategy"] = "group" if strategy == "block" else "token"
        if strategy == "block":
            act["group_size"] = 128
        qc = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "symmetric": True,
                        "dynamic": False,
                        "strategy": strategy,
                        "block_structure": block,
                    },
                    "input_activations": act,
                }
            },
            "ignore": ["lm_head"] if tower else ["lm_head", "re:.*visual.*"],
        }
    elif fmt == "fp8-block":
        qc = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    else:
        qc = {
            "quant_method": "modelopt",
            "quant_algo": "FP8",
            "kv_cache_quant_algo": None,
            "exclude_modules": ["lm_head"],
        }
    _write(out, tensors, qc, "bfloat16")
    return out
