"""Build a model from a checkpoint directory: config -> registry class -> weights -> device."""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.layers.linear import deferred_weights
from polymodal.llm_core.quantization import QuantScheme
from polymodal.llm_core.quantization.apply import (
    QuantizedStream,
    assign_linear_methods,
    checkpoint_tensor_names,
    quantized_linear_names,
    randomize_quantized,
)
from polymodal.llm_core.registry import encoder_class, model_class
from polymodal.llm_core.weights import iter_checkpoint, run_post_load_hooks


def resolve_model_path(
    model: str | Path,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> Path:
    """A local checkpoint directory as is; otherwise a hub id through huggingface_hub, at
    `revision` (a branch, tag or commit; None: main) with `token` (None: HF_TOKEN or the saved
    login), in `cache_dir` (None: the hub client's default). Offline and not cached ->
    ModelNotFoundError naming the id (and revision); a revision with a local directory ->
    InvalidInputError."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InvalidInputError(
                f"revision={revision!r} picks a hub revision, but model {str(model)!r} is a "
                "local directory"
            )
        return path
    if path.exists():
        raise ModelNotFoundError(f"model {str(model)!r} is a file, not a checkpoint directory")
    at = "" if revision is None else f" at revision {revision!r}"
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
        return Path(
            snapshot_download(
                str(model), revision=revision, token=token, cache_dir=cache_dir,
                allow_patterns=patterns,
            )
        )  # fmt: skip
    except Exception as exc:  # hub errors have many types: offline, 404, gated, bad id
        raise ModelNotFoundError(
            f"model {str(model)!r}{at} is not a local directory and could not be fetched from "
            "the Hugging Face hub (offline and not cached, no such repo or revision, or gated): "
            f"{exc.__class__.__name__}"
        ) from exc


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer through transformers, with `chat_template.jinja` as its
    template when it has none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer: {exc}") from exc
    if len(tokenizer) < 2:  # no vocabulary file: transformers builds an empty one, silently
        raise ModelLoadError(
            f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, "
            f"...): the tokenizer transformers built has {len(tokenizer)} token(s)"
        )
    template_file = model_dir / "chat_template.jinja"
    if getattr(tokenizer, "chat_template", None) is None and template_file.is_file():
        tokenizer.chat_template = template_file.read_text()
    return tokenizer


def build_model(
    cfg: ModelConfig,
    device: torch.device,
    backend,
    max_positions: int,
    dummy_weights: bool = False,
    seed: int = 0,
    quant: QuantScheme | None = None,
):
    """Instantiate the registry's class for `cfg` on `device` in `cfg.dtype` and load weights.

    `dummy_weights=True` skips the checkpoint's safetensors (random weights from config alone,
    for benchmarks of full-size architectures with nothing downloaded). `quant`: the scheme
    its linear layers run (`quantization.resolve_quantization`); the 16-bit weights of the
    layers it quantizes are never allocated. The KV-cache scales a checkpoint carries end up
    in `model.checkpoint_kv_scales` ({AttentionLayer: (k_scale, v_scale)}).
    """
    cls = model_class(cfg.architecture, cfg.task)
    # a multimodal model gets its tower class from the registry (model files import no encoder)
    extra = {"tower": encoder_class(cfg.architecture)} if supports_multimodal(cls) else {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            if quant is None:
                model = cls(cfg, backend, max_positions, **extra)
            else:
                with deferred_weights():
                    model = cls(cfg, backend, max_positions, **extra)
                marked = None  # online / dummy: the scheme's rule picks the layers
                if not (quant.online or dummy_weights):
                    names = checkpoint_tensor_names(cfg.model_dir)
                    marked = quantized_linear_names(model, quant, names)
                assign_linear_methods(model, quant, marked)
    finally:
        torch.set_default_dtype(default_dtype)
    stream = QuantizedStream(model, quant)
    if dummy_weights:
        _randomize(model, randomize_quantized(model))
        run_post_load_hooks(model)
    else:
        weights = stream(iter_checkpoint(cfg.model_dir, getattr(cls, "weight_folders", None)))
        model.load_weights(weights, source=str(cfg.model_dir))
    model.checkpoint_kv_scales = stream.attention_scales(model)
    if quant is not None:  # a module built from a deferred layer's device would be left here
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ModelLoadError(f"{cfg.model_dir}: parameters left unbuilt: {meta[:8]}")
    return model.eval()


def _is_norm(module: torch.nn.Module) -> bool:
    """A norm layer (torch's and ours: a `...Norm...` class with `reset_parameters` to its
    identity, e.g. Gemma's and Nemotron's offsets from 1 reset to 0)."""
    return "Norm" in type(module).__name__ and hasattr(module, "reset_parameters")


@torch.no_grad()
def _randomize(model: torch.nn.Module, done: set = frozenset()) -> None:
    """Small random weights, norms at their identity, other vectors 0, so activations stay
    finite at any depth; `done`: ids of parameters already filled (quantized layers). Towers
    are built uninitialized (`make_uninitialized`): every parameter is written here."""
    done = set(done)
    for module in model.modules():
        if _is_norm(module):
            module.reset_parameters()  # weight 1 (offsets from 1: 0), bias 0
            done.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if param.dim() >= 2:
            param.normal_(0.0, 0.02)
        elif ("norm" in name or "ln" in name) and name.endswith("weight"):
            param.fill_(1.0)  # a norm of its own kind: scale 1
        else:
            param.zero_()
