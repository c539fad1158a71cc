"""RoBERTa / XLM-RoBERTa embedding models (`models/roberta.py`): vectors equal transformers'
`RobertaModel` / `XLMRobertaModel` + the declared pooling (CLS + normalize) and
`SentenceTransformer.encode` (bge-m3's layout) on the same tiny weights within 1e-5; positions
from padding_idx + 1, pad tokens at padding_idx; batched prompts equal each alone."""

import pytest
import torch
import transformers as tf

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.models.roberta import roberta_positions
from polymodal.llm_core.pooling import PoolingParams
from tests.helpers import tiny_checkpoint

TEXTS = ["the cat sat on the mat", "hello world", "a quick brown fox jumps over the dog", "x"]
PAD = 0  # the tiny tokenizer's pad token, config.json's pad_token_id
# a prompt with pad tokens inside: they keep position padding_idx and are not counted
IDS = [[5, 6, 7, 8], [5, PAD, 7, PAD, 9, 10], list(range(3, 120))]
TOL = 1e-5


@pytest.fixture(scope="module", params=["roberta_embed", "xlm_roberta_embed"])
def embedder(request, tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, request.param))
    return path, LLM(path, dtype="float32", device="cpu")


def test_positions_start_after_the_padding_index():
    ids = torch.tensor([5, 6, 1, 7, 8, 1, 9])  # two prompts: [5, 6, 1] and [7, 8, 1, 9]
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert roberta_positions(ids, positions, 1).tolist() == [2, 3, 1, 2, 3, 1, 4]


def test_cls_embeddings_match_transformers(embedder):
    path, llm = embedder
    hf = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [llm.tokenizer.encode(t) for t in TEXTS] + IDS
    outs = llm.embed([*TEXTS, *IDS])
    for out, ids in zip(outs, prompts):
        with torch.no_grad():
            cls = hf(torch.tensor([ids])).last_hidden_state[0, 0]  # no mask: every token seen
        want = torch.nn.functional.normalize(cls, dim=-1)
        assert (torch.tensor(out.outputs.embedding) - want).abs().max() <= TOL


def test_xlm_roberta_equals_sentence_transformers(tmp_path_factory):
    st = pytest.importorskip("sentence_transformers")
    path = str(tiny_checkpoint(tmp_path_factory, "xlm_roberta_embed"))
    want = st.SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = torch.tensor([o.outputs.embedding for o in LLM(path, dtype="float32").embed(TEXTS)])
    assert (got - want.cpu()).abs().max() <= TOL


def test_context_and_batching(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "roberta_embed"))
    engine = Engine(path, dtype="float32", device="cpu")
    assert engine.max_model_len == 129  # 130 positions, the first two unused (pad 0)
    with pytest.raises(InvalidInputError, match="130 tokens but max_model_len is 129"):
        engine.add_request(list(range(3, 133)), PoolingParams())
    ids = [engine.add_request(p, PoolingParams()) for p in IDS]
    batched = engine.run_until_done()
    for prompt, rid in zip(IDS, ids):
        alone = Engine(path, dtype="float32", device="cpu")
        one = alone.add_request(prompt, PoolingParams())
        want = alone.run_until_done()[one].outputs.data
        assert torch.allclose(batched[rid].outputs.data, want, atol=1e-6)


# ---- sequence classifiers (cross-encoders) ---------------------------------------------------
def roberta_pair_tokenizer(path):
    """RoBERTa's pair template on the tiny tokenizer: <s> a </s></s> b </s>, every segment id
    0 (stand-ins for <s> / </s>: the demo tokenizer's specials)."""
    from tokenizers.processors import TemplateProcessing

    tok = tf.AutoTokenizer.from_pretrained(path)
    cls, sep = "<|endoftext|>", "<|im_end|>"
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in (cls, sep)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}", special_tokens=specials
    )
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["roberta_cls", "xlm_roberta_cls"])
def test_classifier_matches_transformers(tmp_path_factory, name):
    path = str(tiny_checkpoint(tmp_path_factory, name))
    hf = tf.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == tf.AutoConfig.from_pretrained(path).architectures[0]
    llm = LLM(path, dtype="float32", device="cpu")
    prompts = [llm.tokenizer.encode(t) for t in TEXTS] + IDS
    outs = llm.classify([*TEXTS, *IDS])
    for out, ids in zip(outs, prompts):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].softmax(-1)
        got = torch.tensor(out.outputs.probs)
        assert (got - want).abs().max() <= TOL and abs(float(got.sum()) - 1) < 1e-5


def test_reranker_score_is_the_sigmoid_of_transformers_logit(tmp_path_factory):
    """bge-reranker's layout: XLMRobertaForSequenceClassification with one label, pairs as
    RoBERTa tokenizes them (no segment ids)."""
    path = roberta_pair_tokenizer(
        tiny_checkpoint(tmp_path_factory, "xlm_roberta_cls", num_labels=1)
    )
    hf = tf.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", device="cpu")
    query, docs = "the cat sat", ["on the mat", "hello world", "a fox"]
    for doc, out in zip(docs, llm.score(query, docs)):
        ids = llm.tokenizer(query, text_pair=doc)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, 0].sigmoid()
        assert abs(out.outputs.score - float(want)) <= 1e-5
