"""Safetensors weight loading: streaming, name remaps, packed q/k/v and gate/up, strict checks.

Models own their loading (`ModelBase.load_weights`); `load_weights` here is the default helper
they call with what they declare, as data:
  `packed`  {"q_proj": ("qkv_proj", "q"), ...}: checkpoint shard -> fused param and shard id
  `remap`   [(old_prefix, new_prefix), ...]: e.g. transformers-v5 nesting
  `ignore`  regexes of checkpoint names the model does not use (a pooling model's `lm_head`,
            multi-token-prediction layers, ...): skipped, never "unexpected"
  `tied`    {"lm_head.weight": "model.embed_tokens.weight"}: parameters shared with another
  `experts` {"gate_proj": ("gate_up_proj", 0), ...}: per-expert checkpoint tensors
            `<prefix>.experts.<e>.<name>.weight` -> the stacked `<prefix>.experts.<fused>`
            parameter, shard id `(e, shard)` (HF's names; Mixtral's w1/w2/w3 alike)
Each fused parameter carries a `weight_loader(param, tensor, shard_id)` that copies the
shard into its slice. Missing, unexpected and mis-shaped tensors raise ModelLoadError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.errors import ModelLoadError

# Buffers some checkpoints carry that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# One expert's tensor in a checkpoint: (prefix ending in ".experts", expert index, projection)
_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: a sharded index's shards, or every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weight files")
    return files


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so peak host memory stays near one tensor. A folder
    with no safetensors but PyTorch's `pytorch_model*.bin` files (older checkpoints, EAGLE
    heads) is read from those (`torch.load`, tensors only, memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    bins = sorted(Path(model_dir).glob("pytorch_model*.bin"))
    if bins and not any(Path(model_dir).glob("*.safetensors")):
        for path in bins:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ModelLoadError(f"{path}: unreadable PyTorch weights file ({exc})") from exc
            yield from state.items()
        return
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: unreadable safetensors file ({exc})") from exc


def iter_checkpoint(
    model_dir: str | Path, folders: Mapping[str, str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_safetensors` over a checkpoint published as one folder or as several
    (`ModelBase.weight_folders`: subfolder -> name prefix): the root's tensors as they are,
    then each subfolder's with its prefix. ModelLoadError when none has weights."""
    model_dir = Path(model_dir)
    weights = [*model_dir.glob("*.safetensors"), *model_dir.glob("pytorch_model*.bin")]
    parts = [(model_dir, "")] if not folders or weights else []
    parts += [(model_dir / sub, prefix) for sub, prefix in (folders or {}).items()]
    parts = [(path, prefix) for path, prefix in parts if path == model_dir or path.is_dir()]
    if not parts:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors weight files, nor the folders {sorted(folders or {})}"
        )
    for path, prefix in parts:
        for name, tensor in iter_safetensors(path):
            yield prefix + name, tensor


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
    """Copy a whole tensor into `param` (dtype converted), checking the shape."""
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(tensor)


def resolve_name(
    name: str,
    params: Mapping | set,
    packed: Mapping[str, tuple[str, object]] | None = None,
    remap: Sequence[tuple[str, str]] = (),
    experts: Mapping[str, tuple[str, object]] | None = None,
) -> tuple[str, str, object]:
    """(remapped name, target parameter, shard id or None) of checkpoint tensor `name`, by the
    model's remap, experts and packing tables; `params` holds the model's parameter names (a
    shard packs only into a fused parameter that exists: unfused towers keep their own names).
    An expert's tensor targets the stacked parameter with shard id (expert index, its shard)."""
    for old, new in remap:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    expert = _EXPERT_NAME.match(name) if experts else None
    if expert is not None and expert.group(3) in experts:
        fused_name, sid = experts[expert.group(3)]
        return name, f"{expert.group(1)}.{fused_name}", (int(expert.group(2)), sid)
    for shard_name, (fused_name, sid) in (packed or {}).items():
        fused = name.replace(f".{shard_name}.", f".{fused_name}.")
        if fused != name and fused in params:
            return name, fused, sid
    return name, name, None


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    source: str = "checkpoint",
    packed: Mapping[str, tuple[str, object]] | None = None,
    remap: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
    tied: Mapping[str, str] | None = None,
    experts: Mapping[str, tuple[str, object]] | None = None,
) -> None:
    """Load `weights` into `model` by HF name, following the packing / remap / ignore / tied /
    experts tables the model declares (see the module docstring)."""
    packed = packed or {}
    tied = tied or {}
    skip = re.compile("|".join(f"(?:{p})" for p in ignore)) if ignore else None
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards_seen: dict[str, set] = {}
    unexpected: list[str] = []
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or name in tied:
            continue
        if skip is not None and skip.search(name):
            continue
        name, target, shard_id = resolve_name(name, params, packed, remap, experts)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ModelLoadError(f"{source}: tensor {name!r}: {exc}") from exc
        if shard_id is None:
            loaded.add(target)
        else:
            shards_seen.setdefault(target, set()).add(shard_id)
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensors not in the model: {unexpected[:8]}")
    for target, seen in shards_seen.items():
        if seen >= set(getattr(params[target], "shard_ids", seen)):
            loaded.add(target)
    missing = []
    for n in params:
        if n in loaded or n in tied:
            continue
        absent = [s for s in getattr(params[n], "shard_ids", ()) if s not in shards_seen.get(n, ())]
        missing.append(f"{n} (shards {absent})" if n in shards_seen else n)
    if missing:
        raise ModelLoadError(f"{source}: tensors missing from the checkpoint: {missing[:8]}")
    run_post_load_hooks(model)


def run_post_load_hooks(model: nn.Module) -> None:
    """Let modules derive inference-time tensors (fused, padded copies) from fresh weights."""
    for module in model.modules():
        hook = getattr(module, "post_load", None)
        if callable(hook):
            hook()
