"""The pooling an embedding checkpoint declares, read as vLLM reads it: sentence-transformers'
`modules.json` names a Pooling module (its folder's `config.json` says CLS, mean or last token)
and maybe a Normalize module (-> L2-normalize). Without `modules.json` the model's own default
applies. A module that would change the vectors and is not implemented here (Dense
projections, max or weighted-mean pooling) raises UnsupportedModelError rather than serving
embeddings that differ from sentence-transformers'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polymodal.llm_core.errors import ModelLoadError, UnsupportedModelError
from polymodal.llm_core.pooling import Pooler

# sentence-transformers' pooling modes (its new `pooling_mode` names; legacy
# `pooling_mode_<name>` booleans map onto them) -> our poolers
_MODES = {"cls": Pooler.CLS, "mean": Pooler.MEAN, "lasttoken": Pooler.LAST}
_LEGACY = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# modules that leave the vectors as the transformer + pooling + normalize make them
_NEUTRAL = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class PoolingConfig:
    """How an embedding model turns hidden states into one vector: `pooler`, whether to
    L2-normalize by default (a request's `normalize` overrides), and where that came from."""

    pooler: Pooler
    normalize: bool
    source: str


def load_pooling_config(model_dir: str | Path | None, default: PoolingConfig) -> PoolingConfig:
    """The checkpoint's sentence-transformers pooling (`modules.json`), else `default`."""
    if model_dir is None or not (Path(model_dir) / "modules.json").is_file():
        return default
    path = Path(model_dir) / "modules.json"
    modules = _read_json(path)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    other = sorted(set(kinds) - set(_NEUTRAL))
    if other:
        raise UnsupportedModelError(
            f"{path}: sentence-transformers modules {other} are not supported (only "
            f"{list(_NEUTRAL)}): the embeddings would differ from sentence-transformers'"
        )
    if "Pooling" not in kinds:
        raise UnsupportedModelError(f"{path}: no Pooling module: token embeddings only")
    config_path = Path(model_dir) / kinds["Pooling"].get("path", "") / "config.json"
    mode = _pooling_mode(_read_json(config_path), config_path)
    if mode not in _MODES:
        raise UnsupportedModelError(
            f"{config_path}: pooling mode {mode!r} is not supported (supported: {list(_MODES)})"
        )
    return PoolingConfig(_MODES[mode], "Normalize" in kinds, f"{path.name} ({mode})")


def _pooling_mode(config: dict, path: Path) -> str:
    """The one pooling mode of a Pooling config, new (`pooling_mode`) or legacy format."""
    if config.get("include_prompt", True) is False:
        raise UnsupportedModelError(f"{path}: include_prompt=false (instruction-excluding) pooling")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY.items() if config.get(key)]
        mode = modes or "mean"  # none set: sentence-transformers' default
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str):
        raise UnsupportedModelError(f"{path}: pooling modes {mode} (one mode is supported)")
    return mode


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable sentence-transformers config: {exc}") from exc
