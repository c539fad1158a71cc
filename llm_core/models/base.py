"""What every model class shares: it owns its weight loading (the default helper, driven by the
tables it declares) and lists its layers' KV-cache specs.

The runner's contract with a model: `embed(input_ids)`, `forward(positions, inputs_embeds,
kv_caches, meta) -> hidden`, and `compute_logits(hidden)` (generation) or `pool(...)`
(`SupportsPooling`); `kv_cache_specs()` says what each layer keeps in the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from polymodal.llm_core import weights
from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.kv_cache_spec import KVCacheSpec
from polymodal.llm_core.layers import fused_ops
from polymodal.llm_core.layers.linear import Linear


class ModelBase(nn.Module):
    """A model loaded from an HF checkpoint by parameter name.

    Declared as data (class attributes; see `llm_core/weights.py`): `packed_modules_mapping`
    (checkpoint shards -> fused parameters), `weight_name_remap` (prefix renames),
    `ignored_weights` (regexes of checkpoint tensors the model does not use),
    `expert_modules_mapping` (per-expert tensors -> stacked expert parameters). Instances may
    set `tied_parameters` (parameters shared with another, absent from the checkpoint).
    """

    packed_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = {}
    expert_modules_mapping: ClassVar[dict[str, tuple[str, object]]] = {}
    weight_name_remap: ClassVar[list[tuple[str, str]]] = []
    ignored_weights: ClassVar[tuple[str, ...]] = ()
    #: whether the engine may capture CUDA graphs of small prefill steps (`PrefillGraphs`)
    supports_prefill_graphs: ClassVar[bool] = True
    #: whether it builds its layers split over `current_tp()` (tensor_parallel_size > 1). Read
    #: from the class's own dict, not inherited (`supports_tensor_parallel`): a subclass that
    #: swaps layers is checked under tensor parallelism before it says so.
    supports_tensor_parallel: ClassVar[bool] = False
    #: whether LoRA adapters may wrap its decoder linears (`llm_core/lora`)
    supports_lora: ClassVar[bool] = True
    #: the transformers config class parsing this model's config.json, for model types
    #: transformers does not know (None: `AutoConfig`)
    hf_config_class: ClassVar[type | None] = None
    #: token ids past the LM head's vocab that prompts may hold (embedding rows beyond it:
    #: Mllama's image token)
    extra_input_ids: ClassVar[int] = 0
    #: a checkpoint published as several folders (VILA: `llm/`, `vision_tower/`,
    #: `mm_projector/`): subfolder -> the prefix its tensors' names get when read; tensors in
    #: the root (a single-folder save) are read as they are
    weight_folders: ClassVar[dict[str, str]] = {}
    #: the subfolder holding the tokenizer when the root has none (VILA: "llm")
    tokenizer_folder: ClassVar[str] = ""

    @classmethod
    def splits_over_ranks(cls) -> bool:
        """Whether this class itself (not a parent) declares `supports_tensor_parallel`."""
        return bool(cls.__dict__.get("supports_tensor_parallel", False))

    @classmethod
    def max_prompt_positions(cls, text_config) -> int:
        """The longest sequence its position embeddings hold (the default max_model_len)."""
        return text_config.max_position_embeddings

    @classmethod
    def tokenizer_dir(cls, model_dir):
        """Where the checkpoint in `model_dir` keeps its tokenizer: the root, else
        `tokenizer_folder`."""
        from pathlib import Path

        root = Path(model_dir)
        sub = root / cls.tokenizer_folder
        if cls.tokenizer_folder and not (root / "tokenizer_config.json").is_file():
            if (sub / "tokenizer_config.json").is_file():
                return sub
        return root

    def __init__(self) -> None:
        super().__init__()
        self.tied_parameters: dict[str, str] = {}

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint"
    ) -> None:
        """Load `(name, tensor)` pairs named as in the checkpoint; raises ModelLoadError naming
        missing, unexpected and mis-shaped tensors. Override for a mapping the tables cannot
        say (then call `weights.load_weights` with the rewritten names)."""
        weights.load_weights(
            self,
            named_tensors,
            source,
            packed=self.packed_modules_mapping,
            remap=self.weight_name_remap,
            ignore=self.ignored_weights,
            tied=self.tied_parameters,
            experts=self.expert_modules_mapping,
        )

    def attach_decoder(self, cfg, model: nn.Module) -> None:
        """`self.model` (a decoder stack with `embed_tokens`) under a plain `lm_head`, tied to
        the embedding when the config says: the text families' usual head. Such a model's
        `embed` and `forward` are the defaults below."""
        self.config, self.model = cfg, model
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = model.embed_tokens.weight
            self.tied_parameters = {"lm_head.weight": "model.embed_tokens.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens, hidden]

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model(positions, inputs_embeds, kv_caches, meta)

    def attention_layers(self) -> list[AttentionLayer]:
        """The decoder's attention layers, in layer order (one per `kv_caches` entry)."""
        return [m for m in self.modules() if isinstance(m, AttentionLayer)]

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """What each layer keeps in the KV cache, from its attention spec."""
        return [layer.kv_cache_spec() for layer in self.attention_layers()]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's output `[num_rows, vocab]` in the model dtype (a model may post-process
        it: Gemma's final soft-cap)."""
        return self.lm_head(hidden)

    def compute_logits(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None, argmax=None
    ) -> torch.Tensor:
        """fp32 logits `[num_rows, vocab]`, written into `out` when given (a static buffer);
        `argmax` (int64 `[num_rows]`, with `out`) receives each row's greedy token."""
        logits = self.lm_logits(hidden)
        if out is None:
            return logits.float()
        if argmax is not None and logits.is_cuda and fused_ops() is not None:
            fused_ops().logits_argmax(logits, out, argmax)  # cast + argmax in one kernel
            return out
        out.copy_(logits)
        if argmax is not None:
            torch.argmax(out, dim=-1, out=argmax)
        return out
