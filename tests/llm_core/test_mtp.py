"""DeepSeek-V3's MTP layer as the drafter (`speculative_config={"method": "mtp"}`, no model: the
target checkpoint's own layer `num_hidden_layers`): every proposal equals a reference composed
from transformers' DeepSeek-V3 decoder layer as vLLM composes the MTP layer (embedding zeroed
at position 0, `enorm` / `hnorm`, `eh_proj`, the block, `shared_head`), the whole sequence
recomputed for each draft; greedy outputs equal decoding without drafts; the head's latent
cache sits at the target's block ids; a model without the layer is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint
from tests.llm_core.eagle_reference import record_proposals

PROMPTS = [[(13 * i + 7 * j) % 400 + 20 for j in range(n)] for i, n in enumerate(range(5, 40, 8))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny DeepSeek-V3 with an MTP layer (index 3, an MoE block) in a second file, named
    as the published checkpoints name it."""
    import transformers as tf

    out = tmp_path_factory.mktemp("mtp")
    shutil.copytree(tiny_checkpoint(tmp_path_factory, "deepseek_v3"), out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    hf_config = tf.AutoConfig.from_pretrained(out)
    torch.manual_seed(7)
    block = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(hf_config, 3)
    g = torch.Generator().manual_seed(8)
    tensors = {}
    for name, value in block.state_dict().items():
        if value.is_floating_point():
            scale = 0.5 / value.shape[-1] ** 0.5 if value.dim() >= 2 else 0.1
            base = 1.0 if "norm" in name else 0.0
            value = base + torch.randn(value.shape, generator=g) * scale
        tensors["model.layers.3." + name] = value
    h, vocab = hf_config.hidden_size, hf_config.vocab_size
    for name, shape in (("eh_proj.weight", (h, 2 * h)), ("shared_head.head.weight", (vocab, h)),
                        ("embed_tokens.weight", (vocab, h))):  # fmt: skip
        tensors["model.layers.3." + name] = torch.randn(*shape, generator=g) * (
            0.8 / shape[-1] ** 0.5
        )
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        tensors["model.layers.3." + name] = 1 + 0.1 * torch.randn(h, generator=g)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "mtp.safetensors"))
    return str(out)


def reference_drafts(hf, ckpt: str, context: list[int], k: int) -> list[int]:
    """The MTP layer's k greedy drafts after `context`: transformers' decoder layer for the
    block, the rest as vLLM's DeepSeekMultiTokenPredictorLayer composes it."""
    import transformers as tf
    from safetensors.torch import load_file

    t = load_file(f"{ckpt}/mtp.safetensors")
    config = hf.config
    block = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(config, 3)
    block.load_state_dict({n[len("model.layers.3."):]: v for n, v in t.items()
                           if n[len("model.layers.3."):] in block.state_dict()})  # fmt: skip
    block.eval()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    with torch.no_grad():
        features = hf.model(torch.tensor([context])).last_hidden_state[0, :-1]
        embed = hf.get_input_embeddings().weight
        tokens, drafts = list(context[1:]), []
        for _ in range(k):
            n = len(tokens)
            e = embed[torch.tensor(tokens)].clone()
            e[0] = 0  # position 0's embedding is zeroed
            x = torch.cat([rms(e, t["model.layers.3.enorm.weight"]),
                           rms(features, t["model.layers.3.hnorm.weight"])], -1)  # fmt: skip
            x = (x @ t["model.layers.3.eh_proj.weight"].T)[None]
            positions = torch.arange(n)[None]
            cos_sin = hf.model.rotary_emb(x, positions)
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            out = block(x, attention_mask=mask, position_ids=positions,
                        position_embeddings=cos_sin)[0]  # fmt: skip
            logits = rms(out, t["model.layers.3.shared_head.norm.weight"])
            token = int((logits[-1] @ t["model.layers.3.shared_head.head.weight"].T).argmax())
            drafts.append(token)
            tokens.append(token)
            features = torch.cat([features, out[-1:]])
    return drafts


def _engine(ckpt, spec=True, **kw):
    kw.setdefault("num_kv_blocks", 256)
    if spec:
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": 3}
    return Engine(ckpt, dtype="float32", device="cpu", **kw)


def _run(engine, prompts=PROMPTS):
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


def test_drafts_equal_the_reference_and_outputs_do_not_change(ckpt):
    import transformers as tf

    plain = _run(_engine(ckpt, spec=False))
    engine = _engine(ckpt)
    assert engine.runner.draft.layout.groups[0].spec.kind == "mla"
    seen = record_proposals(engine)
    assert _run(engine) == plain
    assert engine.num_free_blocks == 256 and len(seen) > 10
    hf = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for context, drafts in seen:
        assert drafts == reference_drafts(hf, ckpt, context, len(drafts)), context


def test_a_model_without_the_layer_is_refused(tmp_path_factory):
    """Not DeepSeek-V3 (no such layer), or a checkpoint without the layer's tensors (the tiny
    one declares `num_nextn_predict_layers` as transformers' config does, and has none)."""
    cases = {"llama": "has no multi-token-prediction layer",
             "deepseek_v3": r"holds no model\.layers\.3\.\* tensors"}  # fmt: skip
    for arch, words in cases.items():
        with pytest.raises(InvalidInputError, match=words):
            _engine(str(tiny_checkpoint(tmp_path_factory, arch)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_graphs(ckpt):
    """The target's graphs and the head's own (MLA decode on the latent cache): the outputs of
    decoding without drafts, in fp32."""

    def run(spec):
        config = {"method": "mtp", "num_speculative_tokens": 3} if spec else None
        engine = Engine(ckpt, dtype="float32", device="cuda", num_kv_blocks=256,
                        speculative_config=config)  # fmt: skip
        return engine, _run(engine)

    engine, drafted = run(True)
    assert drafted == run(False)[1]
    assert engine.speculation.drafter.graphs.graphs and engine.speculation.num_draft_tokens
