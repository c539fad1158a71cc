"""Decoder families served as embedding models (`models/decoder_embedding.py`): Qwen3-Embedding's
layout (`Qwen3ForCausalLM` + sentence-transformers last-token pooling + Normalize: chosen
automatically), bare `Qwen3Model` weights, and `runner="pooling"` on a generation checkpoint
(Llama, Qwen2, Qwen3: last token + normalize, vLLM's default); vectors equal
`SentenceTransformer.encode` and transformers' decoder on the same tiny weights within 1e-5."""

import pytest
import torch
import transformers as tf

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.pooling import PoolingParams
from tests.helpers import tiny_checkpoint

TEXTS = ["the cat sat on the mat", "hello world", "a quick brown fox jumps over the dog", "x"]
IDS = [[1, 5, 17, 42, 99, 3, 2], list(range(5, 70))]
TOL = 1e-5


def last_token(path, ids: list[int], bare: bool = False) -> torch.Tensor:
    """transformers' decoder (the causal LM's `.model`, or the bare model) on `ids`: the last
    token's final hidden state, L2-normalized."""
    cls = tf.AutoModel if bare else tf.AutoModelForCausalLM
    hf = cls.from_pretrained(path, dtype=torch.float32).eval()
    decoder = hf if bare else hf.model
    with torch.no_grad():
        hidden = decoder(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)


def check_by_hand(llm, path, bare=False) -> None:
    outs = llm.embed([*TEXTS, *({"prompt_token_ids": ids} for ids in IDS)])
    prompts = [llm.tokenizer.encode(t) for t in TEXTS] + IDS
    for out, ids in zip(outs, prompts):
        assert out.prompt_token_ids == ids
        want = last_token(path, ids, bare)
        assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL


def test_qwen3_embedding_layout_is_an_embedding_model(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen3_embed"))
    llm = LLM(path, dtype="float32", device="cpu")
    assert llm.engine.task == "embed" and not hasattr(llm.engine.runner.model, "lm_head")
    check_by_hand(llm, path)
    st = pytest.importorskip("sentence_transformers")
    want = st.SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert (got - want.cpu()).abs().max() <= TOL
    # the same checkpoint still generates when asked to
    gen = LLM(path, dtype="float32", device="cpu", runner="generate")
    assert gen.engine.task == "generate" and gen.generate("hi")[0].outputs[0].token_ids


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
def test_bare_decoder_weights(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, f"{arch}_model_embed"))  # no `model.` root
    llm = LLM(path, dtype="float32", device="cpu")
    assert llm.engine.task == "embed"
    check_by_hand(llm, path, bare=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_runner_pooling_serves_a_generation_checkpoint(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    assert LLM(path, dtype="float32", device="cpu").engine.task == "generate"
    llm = LLM(path, dtype="float32", device="cpu", runner="pooling")
    assert llm.engine.task == "embed"
    check_by_hand(llm, path)
    raw = llm.encode(TEXTS[0])[0].outputs.data  # encode: before normalization
    unit = torch.tensor(llm.embed(TEXTS[0])[0].outputs.embedding)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), unit, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"pooling model \(task 'embed'\)"):
        llm.generate("hi")


def test_chunked_and_batched_equal_whole_and_alone(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen3_embed"))
    chunked = Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=16)
    ids = [chunked.add_request(p, PoolingParams()) for p in IDS]
    outs = chunked.run_until_done()
    whole = LLM(path, dtype="float32", device="cpu")
    for prompt, rid in zip(IDS, ids):
        want = torch.tensor(whole.embed([prompt])[0].outputs.embedding)
        assert torch.allclose(outs[rid].outputs.data, want, atol=1e-6)


def test_score_and_chat_messages(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen3_embed"))
    llm = LLM(path, dtype="float32", device="cpu")
    vectors = [torch.tensor(o.outputs.embedding) for o in llm.embed(TEXTS[:2])]
    score = llm.score(TEXTS[0], TEXTS[1])[0].outputs.score
    assert abs(score - float(vectors[0] @ vectors[1])) <= TOL
    messages = [{"role": "user", "content": "hello world"}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    got = llm.embed([messages])[0]
    assert got.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)


def test_runner_errors(tmp_path_factory):
    bert = str(tiny_checkpoint(tmp_path_factory, "bert_embed"))
    with pytest.raises(InvalidInputError, match=r"runner='generate': BertModel is a pooling"):
        LLM(bert, dtype="float32", device="cpu", runner="generate")
    with pytest.raises(InvalidInputError, match="runner must be one of"):
        LLM(bert, dtype="float32", device="cpu", runner="embed")
    qwen3 = str(tiny_checkpoint(tmp_path_factory, "qwen3"))
    with pytest.raises(InvalidInputError, match="with a pooling task is not supported"):
        LLM(qwen3, device="cpu", runner="pooling", tensor_parallel_size=2)


def test_multimodal_models_not_declared_embeddable_are_refused():
    """Qwen2-VL / Qwen2.5-VL, the LLaVA family and Gemma 3 serve as embedding models
    (test_vl_embedding.py); the others are refused naming them."""
    from polymodal.llm_core.errors import UnsupportedModelError
    from polymodal.llm_core.registry import model_class

    assert model_class("Qwen2VLForConditionalGeneration", "embed").is_pooling_model
    for arch in ("MllamaForConditionalGeneration", "WhisperForConditionalGeneration",
                 "Llama4ForConditionalGeneration"):  # fmt: skip
        with pytest.raises(UnsupportedModelError, match="takes media"):
            model_class(arch, "embed")
