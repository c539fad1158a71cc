"""Qwen2 reward models (Qwen2.5-Math-RM / -PRM, their checkpoints' own `modeling_qwen2_rm.py`;
transformers has no class for them): the Qwen2 decoder (no LM head) and a scoring MLP
`score = Sequential(Linear(h, h), ReLU, Linear(h, num_labels))` over its final hidden states.

- `Qwen2ForRewardModel` (num_labels 1): the reward is the score of the last token.
- `Qwen2ForProcessRewardModel` (num_labels 2): a reward per step: at every token equal to the
  step tag (Qwen2.5-Math-PRM's `<extra_0>`), the softmax over the two labels (index 1: the
  probability that the step is correct), `[num_steps, 2]`.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsPooling
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import Flavor, LlamaForCausalLM, LlamaModel
from polymodal.llm_core.models.tiny import TinyConfig
from polymodal.llm_core.pooling import Pooler, finish_pooled, pool_rows


class Qwen2RewardBase(SupportsPooling, ModelBase):
    """Qwen2 decoder + scoring MLP; subclasses pick the labels and the pooler."""

    num_labels = 1
    pooler = Pooler.LAST
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    ignored_weights = (r"^lm_head\.",)  # a reward checkpoint may keep its LM head: unused

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        self.step_tag_id = getattr(cfg.text_config, "step_tag_id", None)
        self.model = LlamaModel(cfg, backend, max_positions, Flavor(True, False, False))
        hidden = cfg.hidden_size
        self.score = nn.Sequential(
            Linear(hidden, hidden, bias=True), nn.ReLU(), Linear(hidden, self.num_labels, bias=True)
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens, hidden]

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model(positions, inputs_embeds, kv_caches, meta)

    def pool(self, hidden: list[torch.Tensor], prompts: list) -> list[torch.Tensor]:
        out = []
        for h, prompt in zip(hidden, prompts):
            tag = prompt.params.step_tag_id or self.step_tag_id
            scores = self.score(pool_rows(self.pooler, h, prompt.token_ids, tag))
            out.append(self.finish(scores, prompt.params))
        return out

    def finish(self, scores: torch.Tensor, params) -> torch.Tensor:
        return finish_pooled(scores, params)


class Qwen2ForRewardModel(Qwen2RewardBase):
    """Outcome reward: the score of the last token, `[1]`."""


class Qwen2ForProcessRewardModel(Qwen2RewardBase):
    """Process reward: per step (token == step tag), softmax over 2 labels, `[num_steps, 2]`
    (raw scores with `activation=False` or task "encode")."""

    num_labels = 2
    pooler = Pooler.STEP

    def finish(self, scores: torch.Tensor, params) -> torch.Tensor:
        if params.task == "encode" or params.activation is False:
            return scores.float()
        return scores.float().softmax(-1)


def _tiny_reward(architecture: str, num_labels: int) -> TinyConfig:
    """A Qwen2 config naming the reward architecture; weights from a stand-in module with the
    checkpoint's names (transformers' `Qwen2Model` as `model.` + the scoring MLP)."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        cfg = tf.Qwen2Config(**kwargs, num_labels=num_labels)
        cfg.architectures = [architecture]
        cfg.step_tag_id = ids["<|video_pad|>"]  # the demo tokenizer's stand-in for <extra_0>
        return cfg

    def make_model(hf_config, dtype):
        return TinyRewardCheckpoint(hf_config, num_labels).to(dtype)

    return TinyConfig(architecture, build=build, make_model=make_model)


class TinyRewardCheckpoint(nn.Module):
    """Random weights under a reward checkpoint's names, saved as `save_pretrained` lays them
    out (the tests' reference runs this very module)."""

    def __init__(self, hf_config, num_labels: int):
        super().__init__()
        import transformers as tf

        self.config = hf_config
        self.model = tf.Qwen2Model(hf_config)
        hidden = hf_config.hidden_size
        self.score = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_labels)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores of every token `[batch, seq, num_labels]` (the public modeling code's)."""
        return self.score(self.model(input_ids=input_ids).last_hidden_state)

    def save_pretrained(self, out) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        self.config.save_pretrained(out)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})


TINY_CONFIGS = {
    "qwen2_rm": _tiny_reward("Qwen2ForRewardModel", 1),
    "qwen2_prm": _tiny_reward("Qwen2ForProcessRewardModel", 2),
}
