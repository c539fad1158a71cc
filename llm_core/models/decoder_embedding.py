"""A generation model's decoder served for the embed task (vLLM's `as_embedding_model`):
Qwen3-Embedding (`Qwen3ForCausalLM` weights), gte-Qwen2, Llama-based embedders, and
multimodal ones on a VL model that declares `embeddable` (GME / DSE on Qwen2-VL, E5-V on
LLaVA-NeXT, the LLaVA family, Gemma 3: images and text in one prompt; a VL checkpoint's names
load as the family maps them).

The decoder runs as it does for generation (causal, paged KV cache, chunked prefill); its
final hidden states go through the checkpoint's sentence-transformers modules
(`EmbeddingHead`), last-token pooling + L2 normalization without those files (vLLM's default
for decoder embedders). The LM head is not built: a checkpoint's `lm_head.*` is skipped.
Weights load with the `model.` root (saved from *ForCausalLM) or without it (saved from the
bare *Model, as Qwen3-Embedding's are).
"""

from __future__ import annotations

from itertools import chain

import torch

from polymodal.llm_core.embedding_head import embedding_head
from polymodal.llm_core.errors import UnsupportedModelError
from polymodal.llm_core.interfaces import SupportsPooling, supports_multimodal
from polymodal.llm_core.pooling_config import PoolingConfig

_CLASSES: dict[type, type] = {}


def as_embedding_model(cls: type) -> type:
    """`cls` (a generation model with a `model.` decoder stack; a multimodal one keeps its
    tower: its prompts' media fill their slots as for generation) as an embedding model
    class; one class per `cls`."""
    if supports_multimodal(cls) and not getattr(cls, "embeddable", False):
        raise UnsupportedModelError(
            f"{cls.__name__} takes media: of the multimodal models, Qwen2-VL / Qwen2.5-VL, "
            "the LLaVA family (LLaVA-1.5, -NeXT, -OneVision, Pixtral, Mistral 3) and Gemma 3 "
            "are served for embeddings (runner='pooling')"
        )
    if cls not in _CLASSES:
        attributes = {
            "__doc__": f"{cls.__name__}'s decoder served for embeddings (DecoderEmbedding).",
            "ignored_weights": (*cls.ignored_weights, r"(^|\.)lm_head\."),
        }
        _CLASSES[cls] = type(f"{cls.__name__}ForEmbedding", (DecoderEmbedding, cls), attributes)
    return _CLASSES[cls]


class DecoderEmbedding(SupportsPooling):
    """Mixed in before a decoder class by `as_embedding_model`: drops its LM head and pools
    through an `EmbeddingHead` (`head.`)."""

    default_pooling = PoolingConfig(("lasttoken",), True, "vLLM's default for decoder embedders")

    def __init__(self, cfg, backend, max_positions: int, **parts):
        super().__init__(cfg, backend, max_positions, **parts)  # a multimodal model's tower
        del self.lm_head
        self.tied_parameters = {}
        self.head = embedding_head(cfg.model_dir, cfg.hidden_size, self.default_pooling)

    def load_weights(self, named_tensors, source: str = "checkpoint") -> None:
        """The checkpoint's tensors (a bare decoder's names get the `model.` root), then the
        Dense modules' from their folders."""
        rooted = (
            (name if name.startswith(("model.", "lm_head.")) else "model." + name, tensor)
            for name, tensor in named_tensors
        )
        if supports_multimodal(self):  # a VL checkpoint: names as the family maps them
            rooted = named_tensors
        super().load_weights(chain(rooted, self.head.checkpoint_tensors("head.")), source)

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> list[torch.Tensor]:
        return [self.head(h, prompt.params) for h, prompt in zip(hidden, prompts)]

    def embedding_dimension(self) -> int:
        return self.head.dimension
