"""`QuantScheme`: what a quantization scheme tells the model build and the loader."""

from __future__ import annotations

import re

import torch

from polymodal.llm_core.errors import InvalidInputError

# KV-cache scale tensors as the checkpoint makers name them (llm-compressor: `self_attn.k_scale`;
# ModelOpt / older exports: `self_attn.k_proj.k_scale`, `...k_proj.output_scale`)
KV_SCALE = re.compile(r"^(.*?)\.(k_scale|v_scale|(?:k|v)_proj\.(?:k|v|output)_scale)$")


class QuantScheme:
    """One scheme's answers to the build and the loader; subclasses fill them in.

    `markers`: suffixes of the checkpoint tensors that say a linear layer is stored quantized
    (pre-quantized checkpoints: the checkpoint decides which layers are). `online`: the weights
    are quantized here (`quantization="fp8"` on a 16-bit checkpoint, or dummy weights), so the
    scheme's rule decides: every decoder `Linear` but the LM head and `ignore`. `skipped`:
    suffixes of tensors the methods do not use (static activation scales: activations are
    quantized per token, dynamically).
    """

    name = "?"
    needs_fp8 = False  # the GEMMs need FP8 tensor cores on CUDA (compute capability >= 8.9)
    markers: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def __init__(self, online: bool = False, ignore: list[str] | tuple = ()):
        self.online = online
        self.ignore = tuple(ignore or ())

    def linear_method(self, layer):
        """The `LinearMethod` of a `Linear` this scheme quantizes."""
        raise NotImplementedError

    def owns(self, suffix: str, tensor: torch.Tensor) -> bool:
        """Whether a checkpoint tensor with this name suffix is part of a quantized layer."""
        return suffix in self.markers

    def dequantize(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The fp32 weight `[out, in]` of a quantized checkpoint module (`tensors`: suffix ->
        tensor) whose target runs in 16 bits (a vision tower, a kept LM head)."""
        raise NotImplementedError

    def is_ignored(self, module_name: str) -> bool:
        """Whether `ignore` (names, or `re:` regexes, as llm-compressor writes them) keeps a
        module in 16 bits; a name also matches the modules under it."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.startswith(pattern + "."):
                return True
        return False

    def check_device(self, device: torch.device) -> None:
        """Raise where `device` cannot run the scheme (FP8 GEMMs on a card older than Ada)."""
        if self.needs_fp8:
            check_fp8_device(device, f"quantization={self.name!r}")

    def describe(self) -> str:
        return self.name


def check_fp8_device(device: torch.device, what: str) -> None:
    """FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell) on CUDA; the CPU runs the
    dequantized reference (correct, slow)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise InvalidInputError(
            f"{what} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )
