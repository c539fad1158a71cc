"""What an embedding checkpoint's sentence-transformers files declare, read as vLLM reads them.

`modules.json` lists the modules after the transformer: a Pooling module (its folder's
`config.json`: one or several of cls, max, mean, mean_sqrt_len_tokens, weightedmean,
lasttoken), Dense projections (`in_features`, `out_features`, `bias`, `activation_function`,
weights in the folder) and maybe a Normalize module (-> L2-normalize). Without `modules.json`
the model's own default applies. `sentence_bert_config.json` gives the longest input
(`max_seq_length`: max_model_len is capped at it) and `do_lower_case`. A module that would
change the vectors and is not implemented here raises UnsupportedModelError naming the file,
rather than serving embeddings that differ from sentence-transformers'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.llm_core.errors import ModelLoadError, UnsupportedModelError

# sentence-transformers' pooling modes, in the order its legacy `pooling_mode_<name>` flags
# concatenate them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations: sentence-transformers saves the torch.nn class's full name
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")
_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass(frozen=True)
class DenseConfig:
    """One sentence-transformers Dense module: `activation(x @ W.T + b)` (+ x, or a
    bias-free projection of x, with `residual`); its weights live in `folder`."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "Tanh"
    residual: bool = False


@dataclass(frozen=True)
class PoolingConfig:
    """How an embedding model turns hidden states into one vector: the pooling `modes`
    (several: concatenated), the Dense projections after it, whether to L2-normalize by
    default (a request's `normalize` overrides), and where that came from."""

    modes: tuple[str, ...]
    normalize: bool
    source: str
    dense: tuple[DenseConfig, ...] = field(default_factory=tuple)


def declares_pooling(model_dir: str | Path | None) -> bool:
    """Whether the checkpoint has sentence-transformers files naming a Pooling module (an
    embedding model, whatever its architecture: vLLM's rule for *ForCausalLM embedders)."""
    path = Path(model_dir or "") / "modules.json"
    if model_dir is None or not path.is_file():
        return False
    return "Pooling" in _module_kinds(_read_json(path), path)


def load_pooling_config(model_dir: str | Path | None, default: PoolingConfig) -> PoolingConfig:
    """The checkpoint's sentence-transformers pipeline (`modules.json`), else `default`."""
    if model_dir is None or not (Path(model_dir) / "modules.json").is_file():
        return default
    path = Path(model_dir) / "modules.json"
    modules = _read_json(path)
    order = _module_kinds(modules, path)
    if "Pooling" not in order:
        raise UnsupportedModelError(f"{path}: no Pooling module: token embeddings only")
    if order != sorted(order, key=_MODULES.index):
        raise UnsupportedModelError(
            f"{path}: modules in the order {order}; supported: Transformer, Pooling, Dense..., "
            "Normalize"
        )
    pooling_dir = Path(model_dir) / modules[order.index("Pooling")].get("path", "")
    config_path = pooling_dir / "config.json"
    modes = _pooling_modes(_read_json(config_path), config_path)
    dense = tuple(
        _dense(Path(model_dir) / m.get("path", ""))
        for m, kind in zip(modules, order)
        if kind == "Dense"
    )
    return PoolingConfig(modes, "Normalize" in order, f"{path.name} ({'+'.join(modes)})", dense)


def sentence_bert_config(model_dir: str | Path | None) -> dict:
    """`sentence_bert_config.json`'s `max_seq_length` (None when absent) and `do_lower_case`
    (False when absent)."""
    path = Path(model_dir or "") / "sentence_bert_config.json"
    raw = _read_json(path) if model_dir is not None and path.is_file() else {}
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    length = raw.get("max_seq_length")
    if length is not None and (not isinstance(length, int) or length < 1):
        raise ModelLoadError(f"{path}: max_seq_length must be a positive integer, got {length!r}")
    return {"max_seq_length": length, "do_lower_case": bool(raw.get("do_lower_case", False))}


def _module_kinds(modules, path: Path) -> list[str]:
    """Each module's class name, in order; an unknown one raises naming it."""
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{path}: expected a list of modules")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    other = sorted(set(kinds) - set(_MODULES))
    if other:
        raise UnsupportedModelError(
            f"{path}: sentence-transformers modules {other} are not supported (only "
            f"{list(_MODULES)}): the embeddings would differ from sentence-transformers'"
        )
    return kinds


def _pooling_modes(config: dict, path: Path) -> tuple[str, ...]:
    """The pooling modes of a Pooling config, new (`pooling_mode`) or legacy format."""
    if config.get("include_prompt", True) is False:
        raise UnsupportedModelError(f"{path}: include_prompt=false (instruction-excluding) pooling")
    mode = config.get("pooling_mode")
    if mode is None:  # legacy flags; none set: sentence-transformers' default, mean
        mode = [name for key, name in _LEGACY.items() if config.get(key)] or ["mean"]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if not modes or bad:
        raise UnsupportedModelError(
            f"{path}: pooling mode {bad[0] if bad else mode!r} is not supported "
            f"(supported: {list(POOLING_MODES)})"
        )
    return modes


def _dense(folder: Path) -> DenseConfig:
    path = folder / "config.json"
    raw = _read_json(path)
    activation = raw.get("activation_function") or "torch.nn.modules.activation.Tanh"
    name = activation.rsplit(".", 1)[-1]
    if not activation.startswith("torch.") or name not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{path}: activation_function {activation!r} is not supported (torch.nn's "
            f"{', '.join(ACTIVATIONS)})"
        )
    if raw.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise UnsupportedModelError(f"{path}: a Dense module over the token embeddings")
    try:
        return DenseConfig(
            folder, int(raw["in_features"]), int(raw["out_features"]),
            bool(raw.get("bias", True)), name, bool(raw.get("use_residual", False)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: in_features / out_features missing or bad: {exc}") from exc


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable sentence-transformers config: {exc}") from exc
