"""RoBERTa and XLM-RoBERTa: BERT's encoder (`bert.py`) with RoBERTa's positions.

- Embedding models (`RobertaModel` / `XLMRobertaModel` checkpoints: BAAI/bge-m3's dense
  vector, sentence-transformers' RoBERTa embedders): BERT's embedding head (`EmbeddingHead`);
  `XLMRobertaModel` adds bge-m3's lexical-weight and ColBERT heads (`bge_m3.py`).
- Sequence classifiers (`RobertaForSequenceClassification` /
  `XLMRobertaForSequenceClassification`: cross-encoder rerankers such as BAAI/bge-reranker,
  sentiment classifiers): RoBERTa's head on the first token (`<s>`): dense, tanh, out_proj.

RoBERTa numbers positions from `padding_idx + 1` (config.json's `pad_token_id`), counting only
the tokens that are not the pad token (a pad token gets `padding_idx` itself), as transformers'
`create_position_ids_from_input_ids` does; so a model with `max_position_embeddings` 514 and
pad 1 holds 512 tokens. Segment ids are all 0 (`type_vocab_size` 1).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.models.bert import (
    BertBase,
    BertEmbeddingModel,
    BertEmbeddings,
    BertEncoder,
    check_supported,
)
from polymodal.llm_core.models.tiny import (
    TinyConfig,
    bge_m3_heads,
    both,
    sentence_transformers_files,
)
from polymodal.llm_core.pooling import Pooler, finish_pooled_rows, pooled_rows
from polymodal.llm_core.pooling_config import PoolingConfig


def roberta_positions(
    input_ids: torch.Tensor, positions: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """RoBERTa's position ids of a flat batch of whole prompts: `positions` (0.. per prompt)
    say where each prompt starts. `[num_tokens]` -> `[num_tokens]`."""
    tokens = torch.arange(input_ids.shape[0], device=input_ids.device)
    start = tokens - positions  # each token's prompt's first token
    real = (input_ids != padding_idx).long()
    seen = torch.cumsum(real, 0)
    count = seen - seen[start] + real[start]  # real tokens of its prompt up to and with it
    return count * real + padding_idx


class RobertaPositions:
    """RoBERTa's position numbering over BERT's embeddings (mixed into a `BertBase`)."""

    @classmethod
    def max_prompt_positions(cls, text_config) -> int:
        return text_config.max_position_embeddings - text_config.pad_token_id - 1

    def embed(self, input_ids, positions=None, token_type_ids=None) -> torch.Tensor:
        """Embeddings of word, segment and RoBERTa position (`positions`: 0.. per prompt)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        pad = self.config.text_config.pad_token_id
        return super().embed(
            input_ids, roberta_positions(input_ids, positions, pad), token_type_ids
        )


class RobertaEmbeddingModel(RobertaPositions, BertEmbeddingModel):
    """BERT's embedding model with RoBERTa's positions; weights saved from a task model keep
    a `roberta.` root; its LM head (`lm_head.*`) and tanh pooler are not used."""

    ignored_weights = (r"position_ids$", r"^(roberta\.)?pooler\.", r"^lm_head\.")
    weight_name_remap = [("roberta.", "")]
    default_pooling = PoolingConfig(("cls",), normalize=True, source="vLLM's RoBERTa default")


class RobertaForSequenceClassification(RobertaPositions, BertBase):
    """Encoder + RoBERTa's classification head on the first token: one probability vector
    (or raw logits with task "encode") per prompt; with one label, a cross-encoder's
    relevance (`LLM.score`, `/score`, `/rerank`: its sigmoid)."""

    pooler = Pooler.CLS
    ignored_weights = (r"position_ids$", r"^lm_head\.")

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        check_supported(cfg)
        self.config = cfg
        hidden = cfg.hidden_size
        self.roberta = nn.Module()
        self.roberta.embeddings = BertEmbeddings(cfg)
        self.roberta.encoder = BertEncoder(cfg, backend)
        self.classifier = nn.Module()
        self.classifier.dense = Linear(hidden, hidden)
        self.classifier.out_proj = Linear(hidden, cfg.text_config.num_labels)

    @property
    def bert_root(self) -> nn.Module:
        return self.roberta

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> torch.Tensor | list[torch.Tensor]:
        first = pooled_rows(self.pooler, hidden, prompts)  # [prompts, hidden]
        head = self.classifier
        logits = head.out_proj(torch.tanh(head.dense(first)))  # [prompts, labels]
        return finish_pooled_rows(logits, prompts)


# 2 layers, hidden 64, 4 heads; positions 0..129 with the pad token 0: 129 tokens
TINY_ROBERTA = {"max_position_embeddings": 130, "type_vocab_size": 1, "layer_norm_eps": 1e-5}

TINY_CONFIGS = {
    # no sentence-transformers files: CLS + normalize (vLLM's default)
    "roberta_embed": TinyConfig("RobertaModel", TINY_ROBERTA),
    # bge-m3's layout: CLS pooling + Normalize, its lexical-weight and ColBERT heads
    # (`bge_m3.py`)
    "xlm_roberta_embed": TinyConfig(
        "XLMRobertaModel",
        TINY_ROBERTA,
        write_extra=both(sentence_transformers_files("cls"), bge_m3_heads()),
    ),
    "roberta_cls": TinyConfig(
        "RobertaForSequenceClassification", {**TINY_ROBERTA, "num_labels": 3}
    ),
    "xlm_roberta_cls": TinyConfig(
        "XLMRobertaForSequenceClassification", {**TINY_ROBERTA, "num_labels": 3}
    ),
}
