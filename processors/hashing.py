"""Content hashes of preprocessed media: the key of the encoder cache and of prefix-cache blocks."""

from __future__ import annotations

import hashlib

import torch


def content_hash(modality: str, tensors: dict[str, torch.Tensor]) -> str:
    """blake2b (128-bit, hex) over the modality and each tensor's name, dtype, shape and bytes.

    Hashing the *processed* tensors means two requests share a hash exactly when the encoder
    would see the same input (same pixels after resize, same grid), whatever the source format.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(modality.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # viewed as bytes: works for every dtype and hashes the buffer without a copy
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
