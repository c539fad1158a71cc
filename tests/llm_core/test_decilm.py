"""DeciLM / Nemotron-NAS. transformers has no class for them: an independent reference, written
here from the published modeling code's semantics (per layer: attention standard with its own
kv-head count / one linear matrix / nothing; FFN SwiGLU of its own size / one matrix / nothing;
each pre-RMSNorm with a residual add; Llama's rotary), reads the checkpoint files and is
checked against the engine; plus the properties that must hold: all-standard blocks are Llama
(transformers' LlamaForCausalLM on the same tensors), a no-op layer is the same as no layer,
and layers without attention keep no KV cache."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.models.decilm import _block
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import hf_greedy, record_logits_by_request, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],
    [7, 8, 9],
    [300 + i for i in range(40)],
]
STEPS = 8


class ReferenceDeciLM:
    """The published semantics in plain torch, from config.json and model.safetensors."""

    def __init__(self, path):
        self.cfg = json.loads((path / "config.json").read_text())
        self.w = load_file(str(path / "model.safetensors"))
        cfg = self.cfg
        self.heads = cfg["num_attention_heads"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.inv_freq = 1.0 / theta**dims

    def rms(self, name, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])
        return self.w[name + ".weight"] * h

    def rotate(self, x, positions):  # neox halves: x [heads, L, d]
        freqs = torch.outer(positions.float(), self.inv_freq)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def attention(self, p, x, group):
        kv_heads, d, length = self.heads // group, self.head_dim, x.shape[0]
        q = (x @ self.w[p + "q_proj.weight"].T).view(length, self.heads, d).transpose(0, 1)
        k = (x @ self.w[p + "k_proj.weight"].T).view(length, kv_heads, d).transpose(0, 1)
        v = (x @ self.w[p + "v_proj.weight"].T).view(length, kv_heads, d).transpose(0, 1)
        pos = torch.arange(length)
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, -1)
        return out @ self.w[p + "o_proj.weight"].T

    def logits(self, ids):
        x = self.w["model.embed_tokens.weight"][ids]
        for i, block in enumerate(self.cfg["block_configs"]):
            p, attn, ffn = f"model.layers.{i}.", block["attention"], block["ffn"]
            if not attn["no_op"]:
                h = self.rms(p + "input_layernorm", x)
                if attn["replace_with_linear"]:
                    x = x + h @ self.w[p + "self_attn.linear_attn.weight"].T
                else:
                    x = x + self.attention(p + "self_attn.", h, attn["n_heads_in_group"])
            if not ffn["no_op"]:
                h = self.rms(p + "post_attention_layernorm", x)
                if ffn["replace_with_linear"]:
                    x = x + h @ self.w[p + "mlp.linear_mlp.weight"].T
                else:
                    gate, up = (
                        h @ self.w[p + "mlp.gate_proj.weight"].T,
                        h @ self.w[p + "mlp.up_proj.weight"].T,
                    )
                    x = x + (F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T
        return self.rms("model.norm", x) @ self.w["lm_head.weight"].T

    def greedy(self, prompt, steps):
        ids, seen = list(prompt), []
        for _ in range(steps):
            seen.append(self.logits(torch.tensor(ids))[-1])
            ids.append(int(seen[-1].argmax()))
        return ids[len(prompt) :], seen


def _engine_run(path, **kw):
    kw = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 128, **kw}
    engine = Engine(str(path), **kw)
    seen = record_logits_by_request(engine)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    final = engine.run_until_done()
    return engine, [(final[i].outputs[0].token_ids, seen[i]) for i in ids]


def _assert_same(runs, refs, atol=1e-4):
    for i, ((tokens, logits), (ref_tokens, ref_logits)) in enumerate(zip(runs, refs)):
        assert tokens == ref_tokens, f"prompt {i}: greedy tokens differ"
        for step, (a, b) in enumerate(zip(logits, ref_logits)):
            diff = (a.cpu() - b).abs().max().item()
            assert diff <= atol, f"prompt {i} step {step}: max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("arch", ["decilm", "nemotron_nas"])
def test_matches_the_independent_reference(tmp_path_factory, arch):
    path = tiny_checkpoint(tmp_path_factory, arch)
    reference = ReferenceDeciLM(path)
    engine, runs = _engine_run(path, max_num_batched_tokens=7)  # chunked prefill too
    _assert_same(runs, [reference.greedy(p, STEPS) for p in PROMPTS])
    # no KV cache for layers without attention; each layer's cache has its kv-head count
    blocks = reference.cfg["block_configs"]
    standard = [b["attention"] for b in blocks if not (b["attention"]["no_op"]
                or b["attention"]["replace_with_linear"])]  # fmt: skip
    caches = engine.runner.kv_caches
    assert [c.shape[3] for c in caches] == [4 // a["n_heads_in_group"] for a in standard]
    assert engine.scheduler.kv.specs and len(engine.scheduler.kv.specs) == 1  # one table


def _copy(src, dst, config_update=None, rename=None):
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config))
    if rename is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        renamed = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
        save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_all_standard_blocks_are_llama(tmp_path_factory, tmp_path):
    """Every layer standard with one n_heads_in_group and one ffn_mult: transformers' Llama
    with those kv heads and that intermediate size, on the very same tensors."""
    import transformers as tf

    blocks = [_block(group=2, ffn_mult=2.5)] * 3  # kv heads 2, intermediate 256
    path = tiny_checkpoint(tmp_path_factory, "decilm", block_configs=blocks, num_hidden_layers=3)
    llama = _copy(path, tmp_path, {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                   "num_key_value_heads": 2, "intermediate_size": 256})  # fmt: skip
    hf = tf.LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    _, runs = _engine_run(path)
    _assert_same(runs, [hf_greedy(hf, p, STEPS) for p in PROMPTS])


def test_a_no_op_layer_is_the_same_as_no_layer(tmp_path_factory, tmp_path):
    path = tiny_checkpoint(tmp_path_factory, "decilm")  # layer 5 is no-op / no-op
    blocks = json.loads((path / "config.json").read_text())["block_configs"]
    skipped = [*blocks[:5]]
    shorter = _copy(path, tmp_path, {"block_configs": skipped, "num_hidden_layers": 5})
    _, with_layer = _engine_run(path)
    _, without = _engine_run(shorter)
    _assert_same(with_layer, without, atol=0.0)

    # a no-op layer in the middle: layer 1 of three standard ones, renumbered away
    middle = [_block(group=2), _block("no_op", "no_op"), _block(group=4)]
    path = tiny_checkpoint(tmp_path_factory, "decilm", block_configs=middle, num_hidden_layers=3)
    renumber = lambda n: n.replace("model.layers.2.", "model.layers.1.")  # noqa: E731
    update = {"block_configs": [middle[0], middle[2]], "num_hidden_layers": 2}
    two = _copy(path, tmp_path_factory.mktemp("two"), update, renumber)
    _assert_same(_engine_run(path)[1], _engine_run(two)[1], atol=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["decilm", "nemotron_nas"])
def test_cuda_triton_graphs_match_the_reference(tmp_path_factory, arch):
    """CUDA, Triton backend with decode and prefill graphs, per-layer cache shapes: fp32 logits
    within 1e-4 of the reference."""
    path = tiny_checkpoint(tmp_path_factory, arch)
    reference = ReferenceDeciLM(path)
    engine, runs = _engine_run(path, device="cuda", attention_backend="triton")
    _assert_same(runs, [reference.greedy(p, STEPS) for p in PROMPTS])
    assert engine.runner.graphs is not None and engine.runner.graphs.runs > 0
