"""RoBERTa and XLM-RoBERTa embedding models (`RobertaModel` / `XLMRobertaModel` checkpoints:
BAAI/bge-m3's dense vector, sentence-transformers' RoBERTa embedders): BERT's encoder and
embedding head (`bert.py`, `EmbeddingHead`); only the positions differ.

RoBERTa numbers positions from `padding_idx + 1` (config.json's `pad_token_id`), counting only
the tokens that are not the pad token (a pad token gets `padding_idx` itself), as transformers'
`create_position_ids_from_input_ids` does; so a model with `max_position_embeddings` 514 and
pad 1 holds 512 tokens. Segment ids are all 0 (`type_vocab_size` 1).
"""

from __future__ import annotations

import torch

from polymodal.llm_core.models.bert import BertEmbeddingModel
from polymodal.llm_core.models.tiny import TinyConfig, sentence_transformers_files
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


class RobertaEmbeddingModel(BertEmbeddingModel):
    """BERT's embedding model with RoBERTa's positions; weights saved from a task model keep
    a `roberta.` root; its LM head (`lm_head.*`) and tanh pooler are not used."""

    ignored_weights = (r"position_ids$", r"^(roberta\.)?pooler\.", r"^lm_head\.")
    weight_name_remap = [("roberta.", "")]
    default_pooling = PoolingConfig(("cls",), normalize=True, source="vLLM's RoBERTa default")

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


# 2 layers, hidden 64, 4 heads; positions 0..129 with the pad token 0: 129 tokens
_TINY_ROBERTA = {"max_position_embeddings": 130, "type_vocab_size": 1, "layer_norm_eps": 1e-5}

TINY_CONFIGS = {
    # no sentence-transformers files: CLS + normalize (vLLM's default)
    "roberta_embed": TinyConfig("RobertaModel", _TINY_ROBERTA),
    # bge-m3's layout: CLS pooling + Normalize
    "xlm_roberta_embed": TinyConfig(
        "XLMRobertaModel", _TINY_ROBERTA, write_extra=sentence_transformers_files("cls")
    ),
}
