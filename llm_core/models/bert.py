"""BERT: a bidirectional encoder (absolute position and token-type embeddings, post-LayerNorm
blocks, GELU MLP). Its layers keep no KV cache: each prompt runs whole in one step and attends
over its own tokens (`Mask.BIDIRECTIONAL`). HF parameter names; query/key/value packed.

- `BertForSequenceClassification`: the tanh pooler on the [CLS] token and a linear classifier.
- `BertEmbeddingModel` (checkpoints naming `BertModel`: sentence-transformers' all-MiniLM,
  BAAI/bge): the encoder's hidden states pooled as the checkpoint declares
  (`pooling_config.py`: modules.json), CLS + L2 normalization without those files (vLLM's
  default for BERT).
"""

from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.embedding_head import embedding_head
from polymodal.llm_core.errors import UnsupportedModelError
from polymodal.llm_core.interfaces import SupportsPooling
from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.layers.norm import LayerNorm
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.tiny import TinyConfig, sentence_transformers_files
from polymodal.llm_core.pooling import Pooler, finish_pooled_rows, pooled_rows
from polymodal.llm_core.pooling_config import PoolingConfig


class BertEmbeddings(nn.Module):
    """word + token type + absolute position embeddings, then LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        text = cfg.text_config
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(text.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(text.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=text.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids) -> torch.Tensor:
        embeds = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(embeds, self.position_embeddings(positions))  # LN(embeds + pos)


class BertLayer(nn.Module):
    """x = LN(x + attn(x)); x = LN(x + down(gelu(up(x)))), with HF's module nesting. Each
    residual add runs inside its LayerNorm (one pass on CUDA); the biases inside the GEMMs
    (`F.linear`: cuBLAS's bias epilogue)."""

    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        text, hidden = cfg.text_config, cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, hidden // cfg.num_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.qkv = PackedLinear(
            hidden, {"q": hidden, "k": hidden, "v": hidden}, True
        )
        self.attention.output = nn.Module()
        self.attention.output.dense = Linear(hidden, hidden)
        self.attention.output.LayerNorm = LayerNorm(hidden, eps=text.layer_norm_eps)
        spec = AttentionSpec(
            self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5, Mask.BIDIRECTIONAL
        )
        self.attn = AttentionLayer(spec, backend)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(hidden, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = Linear(cfg.intermediate_size, hidden)
        self.output.LayerNorm = LayerNorm(hidden, eps=text.layer_norm_eps)

    def forward(self, x: torch.Tensor, meta) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.attention.self.qkv(x).view(num_tokens, 3, self.num_heads, -1).unbind(1)
        attn = self.attn(q, k, v, None, None, meta)  # [num_tokens, hidden]
        out = self.attention.output
        x = out.LayerNorm(out.dense(attn), x)  # LN(dense(attn) + x)
        up = F.gelu(self.intermediate.dense(x))  # erf GELU ("gelu")
        return self.output.LayerNorm(self.output.dense(up), x)


class BertEncoder(nn.Module):
    """The stack of `BertLayer`s (HF's `encoder.layer.<i>`)."""

    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, backend) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, meta) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, meta)
        return x  # [num_tokens, hidden]


def check_supported(cfg: ModelConfig) -> None:
    text = cfg.text_config
    if getattr(text, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("BERT with relative position embeddings")
    if text.hidden_act != "gelu":
        raise UnsupportedModelError(f"BERT with hidden_act {text.hidden_act!r}")


class BertBase(SupportsPooling, ModelBase):
    """What both BERT heads share: bidirectional, absolute embeddings, packed q/k/v. A subclass
    says where its `embeddings` and `encoder` live (`bert_root`) and implements `pool`."""

    is_causal = False
    # the pooling step passes positions and segment ids to `embed` (absolute embeddings)
    embeds_positions = True
    packed_modules_mapping = {
        "query": ("qkv", "q"),
        "key": ("qkv", "k"),
        "value": ("qkv", "v"),
    }

    @property
    def bert_root(self) -> nn.Module:
        """The module holding `embeddings` and `encoder` (HF: `bert.` or the root)."""
        raise NotImplementedError

    def embed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings of word, segment (default 0) and absolute position (default 0..n-1)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.bert_root.embeddings(input_ids, positions, token_type_ids)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.bert_root.encoder(inputs_embeds, meta)  # [num_tokens, hidden]


class BertForSequenceClassification(BertBase):
    """Encoder + [CLS] pooler + classifier: one probability vector (or raw logits with task
    "encode") per prompt."""

    pooler = Pooler.CLS
    ignored_weights = (r"position_ids$", r"^cls\.")  # buffers, pretraining heads

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        check_supported(cfg)
        self.config = cfg
        self.bert = nn.Module()
        self.bert.embeddings = BertEmbeddings(cfg)
        self.bert.encoder = BertEncoder(cfg, backend)
        self.bert.pooler = nn.Module()
        self.bert.pooler.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = Linear(cfg.hidden_size, cfg.text_config.num_labels)

    @property
    def bert_root(self) -> nn.Module:
        return self.bert

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> torch.Tensor | list[torch.Tensor]:
        cls = pooled_rows(self.pooler, hidden, prompts)  # [prompts, hidden]
        logits = self.classifier(torch.tanh(self.bert.pooler.dense(cls)))  # [prompts, labels]
        return finish_pooled_rows(logits, prompts)


class BertEmbeddingModel(BertBase):
    """`BertModel` checkpoints served for the embed task: the encoder's final hidden states
    through the checkpoint's sentence-transformers modules (`EmbeddingHead`: pooling modes,
    Dense projections, Normalize), CLS + L2 normalization without those files (vLLM's default).
    A request's `normalize` overrides; task "encode": the vector before normalization.
    The tanh pooler (`pooler.dense`) is not used: sentence-transformers does not read it."""

    # the `pooler.` weights are unused; checkpoints saved from a task model keep a `bert.` root
    ignored_weights = (r"position_ids$", r"^(bert\.)?pooler\.", r"^cls\.")
    weight_name_remap = [("bert.", "")]
    default_pooling = PoolingConfig(("cls",), normalize=True, source="vLLM's BERT default")

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        check_supported(cfg)
        self.config = cfg
        # HF BertModel's names: `embeddings.*`, `encoder.layer.<i>.*` at the root
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, backend)
        self.head = embedding_head(cfg.model_dir, cfg.hidden_size, self.default_pooling)

    @property
    def bert_root(self) -> nn.Module:
        return self

    def load_weights(self, named_tensors, source: str = "checkpoint") -> None:
        """The checkpoint's tensors, then the Dense modules' from their folders (`head.`)."""
        tensors = chain(named_tensors, self.head.checkpoint_tensors("head."))
        super().load_weights(tensors, source)

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> list[torch.Tensor]:
        return [self.head(h, prompt.params) for h, prompt in zip(hidden, prompts)]

    def embedding_dimension(self) -> int:
        return self.head.dimension


# 2 layers, hidden 64, 4 heads, 2 segment types, absolute positions up to 128
_TINY_BERT = {"max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12}

TINY_CONFIGS = {
    "bert_cls": TinyConfig("BertForSequenceClassification", {**_TINY_BERT, "num_labels": 3}),
    # embedding models: no sentence-transformers files (CLS + normalize, vLLM's default) ...
    "bert_embed": TinyConfig("BertModel", _TINY_BERT),
    # ... mean pooling + Normalize (all-MiniLM-L6-v2's layout), CLS without Normalize
    "bert_st_mean": TinyConfig(
        "BertModel", _TINY_BERT, write_extra=sentence_transformers_files("mean")
    ),
    "bert_st_cls": TinyConfig(
        "BertModel", _TINY_BERT, write_extra=sentence_transformers_files("cls", normalize=False)
    ),
    # max + mean concatenated, two Dense projections (tanh, GELU), Normalize
    "bert_st_dense": TinyConfig(
        "BertModel",
        _TINY_BERT,
        write_extra=sentence_transformers_files(
            ("max", "mean"), dense=((48, "Tanh"), (32, "GELU"))
        ),
    ),
    # sqrt-length mean + weighted mean, an identity Dense, no Normalize; inputs of at most 12
    # tokens, lower-cased
    "bert_st_short": TinyConfig(
        "BertModel",
        _TINY_BERT,
        write_extra=sentence_transformers_files(
            ("mean_sqrt_len_tokens", "weightedmean"),
            normalize=False,
            dense=((40, "Identity"),),
            max_seq_length=12,
            do_lower_case=True,
        ),
    ),
}
