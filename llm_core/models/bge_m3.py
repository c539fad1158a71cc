"""BAAI/bge-m3's three outputs from one XLM-RoBERTa encoder, as FlagEmbedding's
`BGEM3FlagModel` computes them and vLLM's `BgeM3EmbeddingModel` serves them:

- dense (task "embed"): RoBERTa's embedding model (`RobertaEmbeddingModel`): CLS, normalized.
- lexical weights (task "token_classify"): `relu(sparse_linear(h))`, one weight per token; as
  vLLM, the first token's weight is dropped when it is BOS and the last one's when it is EOS
  (config.json's ids). `lexical_weights()` folds them into FlagEmbedding's
  {token id: max weight} (special tokens and zero weights left out).
- ColBERT vectors (task "token_embed"): `colbert_linear(h)` of every token after the first
  (BOS: the CLS token), L2-normalized per token unless the request's `normalize` is False.

The two heads are the checkpoint folder's `sparse_linear.pt` (Linear hidden -> 1) and
`colbert_linear.pt` (Linear hidden -> colbert dim), plain state dicts read with
`torch.load(weights_only=True)`; a head whose file is absent is not built, and a request for
its task is refused naming the file (`check_token_task`). Heads run in float32.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.models.roberta import TINY_ROBERTA, RobertaEmbeddingModel
from polymodal.llm_core.models.tiny import (
    TinyConfig,
    bge_m3_heads,
    both,
    sentence_transformers_files,
)


class BgeM3EmbeddingModel(RobertaEmbeddingModel):
    """RoBERTa's embedding model + bge-m3's lexical-weight and ColBERT heads (served for
    `XLMRobertaModel` checkpoints and vLLM's `BgeM3EmbeddingModel` architecture override)."""

    token_task_files = {"token_classify": "sparse_linear.pt", "token_embed": "colbert_linear.pt"}

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__(cfg, backend, max_positions)
        text = cfg.text_config
        self.bos_token_id = getattr(text, "bos_token_id", None)
        self.eos_token_id = getattr(text, "eos_token_id", None)
        self.sparse_linear: nn.Linear | None = None
        self.colbert_linear: nn.Linear | None = None
        self._head_states: dict[str, dict[str, torch.Tensor]] = {}  # until load_weights
        for file in self.token_task_files.values():
            path = Path(cfg.model_dir or "") / file
            if cfg.model_dir is None or not path.is_file():
                continue
            state = _read_head(path, cfg.hidden_size, 1 if file == "sparse_linear.pt" else None)
            out_features, in_features = state["weight"].shape
            name = file.removesuffix(".pt")
            layer = nn.Linear(in_features, out_features, "bias" in state, dtype=torch.float32)
            setattr(self, name, layer)
            self._head_states[name] = state

    def load_weights(self, named_tensors, source: str = "checkpoint") -> None:
        """The checkpoint's tensors, then the heads' from their .pt files."""
        heads = [
            (f"{name}.{key}", tensor)
            for name, state in self._head_states.items()
            for key, tensor in state.items()
        ]
        self._head_states = {}
        super().load_weights(chain(named_tensors, heads), source)

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> list[torch.Tensor]:
        out = []
        for h, prompt in zip(hidden, prompts):
            task = prompt.params.task
            if task == "token_classify":
                out.append(self.token_weights(h, prompt.token_ids, prompt.params))
            elif task == "token_embed":
                out.append(self.colbert_vectors(h, prompt.token_ids, prompt.params))
            else:
                out.append(self.head(h, prompt.params))
        return out

    def token_weights(self, hidden: torch.Tensor, token_ids: list[int], params) -> torch.Tensor:
        """One prompt's `hidden [num_tokens, hidden]` -> its lexical weight per token
        `[num_tokens - dropped]` (BOS first / EOS last dropped; `activation=False`: before
        the ReLU)."""
        weights = self.sparse_linear(hidden.float()).squeeze(-1)  # [num_tokens]
        if params.activation is not False:
            weights = torch.relu(weights)
        start = 1 if token_ids[0] == self.bos_token_id else 0
        end = len(token_ids) - (1 if token_ids[-1] == self.eos_token_id else 0)
        return weights[start : max(start, end)]

    def colbert_vectors(self, hidden: torch.Tensor, token_ids: list[int], params) -> torch.Tensor:
        """One prompt's `hidden [num_tokens, hidden]` -> its ColBERT vectors
        `[num_tokens - 1, colbert dim]` (the first token, BOS, dropped), normalized per token
        unless `params.normalize` is False."""
        start = 1 if token_ids[0] == self.bos_token_id else 0
        vectors = self.colbert_linear(hidden[start:].float())
        if params.normalize is False:
            return vectors
        return torch.nn.functional.normalize(vectors, dim=-1)


def lexical_weights(prompt_token_ids: list[int], token_weights, tokenizer) -> dict[int, float]:
    """FlagEmbedding's lexical weights from a "token_classify" output: {token id: its largest
    weight}, without the tokenizer's cls, eos, pad and unk tokens and without weights <= 0.
    `token_weights` (a tensor or list) are those of `prompt_token_ids` less a leading BOS and
    a trailing EOS (what the model drops; the tokenizer's EOS is config.json's)."""
    weights = [float(w) for w in token_weights]
    ids = list(prompt_token_ids)
    dropped = len(ids) - len(weights)
    if dropped == 2 or (dropped == 1 and ids[-1] != tokenizer.eos_token_id):
        ids = ids[1:]  # the leading BOS has no weight
    roles = ("cls_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    skip = {getattr(tokenizer, role, None) for role in roles} - {None}
    result: dict[int, float] = {}
    for token, weight in zip(ids, weights):
        if token not in skip and weight > result.get(token, 0.0):
            result[token] = weight
    return result


def _read_head(path: Path, hidden_size: int, out_features: int | None) -> dict:
    """A head's state dict (`weight [out, hidden]`, optional `bias [out]`), checked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle torch refuses, a truncated file, ...
        raise ModelLoadError(f"{path}: cannot read the head's state dict: {exc}") from exc
    if not isinstance(state, dict) or set(state) - {"weight", "bias"} or "weight" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ModelLoadError(f"{path}: expected a Linear's state dict (weight, bias), got {keys}")
    weight = state["weight"]
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ModelLoadError(
            f"{path}: weight has shape {tuple(weight.shape)}, expected [out, {hidden_size}]"
        )
    if out_features is not None and weight.shape[0] != out_features:
        raise ModelLoadError(
            f"{path}: weight has {weight.shape[0]} outputs, expected {out_features}"
        )
    return state


def _named_bge_m3(out_dir, tokenizer) -> None:
    """config.json names vLLM's override architecture itself (what `hf_overrides` would set)."""
    import json

    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["BgeM3EmbeddingModel"]
    path.write_text(json.dumps(config, indent=2))


def _xlm_roberta(kwargs: dict, token_ids: dict):
    import transformers as tf

    return tf.XLMRobertaConfig(**kwargs)


def _hf_xlm_roberta(hf_config, dtype):
    import transformers as tf

    return tf.XLMRobertaModel(hf_config).to(dtype)


TINY_CONFIGS = {
    # xlm_roberta_embed's checkpoint (bge-m3's layout) whose config.json names the architecture
    "bge_m3": TinyConfig(
        "BgeM3EmbeddingModel",
        TINY_ROBERTA,
        build=_xlm_roberta,
        make_model=_hf_xlm_roberta,
        write_extra=both(sentence_transformers_files("cls"), bge_m3_heads(), _named_bge_m3),
    ),
}
