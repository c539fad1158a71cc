"""What sentence-transformers checkpoints declare beyond CLS / mean pooling, each equal to
`SentenceTransformer.encode` on the same tiny weights within 1e-5: pooling modes max,
mean_sqrt_len_tokens and weightedmean (several concatenated), Dense projections,
sentence_bert_config.json (`max_seq_length` caps max_model_len, `do_lower_case`),
`truncate_prompt_tokens`, and Matryoshka `dimensions`."""

import pytest
import torch

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.pooling import PoolingParams
from tests.helpers import tiny_checkpoint

st = pytest.importorskip("sentence_transformers")

LONG = "Once upon a time there was a small model that wrote random words, one token at a time."
TEXTS = ["The Cat sat on the MAT", "hello world", LONG, "x"]
TOL = 1e-5


def vectors(outs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outs])


def close(got, want) -> bool:
    return got.shape == want.shape and (got - want.cpu()).abs().max() <= TOL


@pytest.fixture(scope="module", params=["bert_st_dense", "bert_st_short"])
def checkpoint(request, tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, request.param))
    model = st.SentenceTransformer(path, device="cpu")
    return request.param, LLM(path, dtype="float32", device="cpu"), model


def test_modes_dense_and_lower_case_equal_sentence_transformers(checkpoint):
    name, llm, model = checkpoint
    want = model.encode(TEXTS, convert_to_tensor=True)  # long inputs cut at max_seq_length
    got = vectors(llm.embed(TEXTS, truncate_prompt_tokens=-1))
    assert close(got, want)
    assert got.shape[1] == (32 if name == "bert_st_dense" else 40)  # the last Dense's size
    unit = bool((got.norm(dim=1) - 1).abs().max() < 1e-5)
    assert unit == (name == "bert_st_dense")  # a Normalize module, or not
    # do_lower_case (bert_st_short): the case of a text does not matter
    cased, lower = vectors(llm.embed([TEXTS[0], TEXTS[0].lower()]))
    assert torch.equal(cased, lower) == (name == "bert_st_short")


def test_encode_is_the_vector_before_normalization(checkpoint):
    _, llm, _ = checkpoint
    raw = llm.encode(TEXTS[:2])
    plain = vectors(llm.embed(TEXTS[:2], PoolingParams(normalize=False)))
    assert close(torch.stack([o.outputs.data for o in raw]), plain)


def test_max_seq_length_caps_max_model_len(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_st_short"))  # max_seq_length 12
    llm = LLM(path, dtype="float32", device="cpu")
    assert llm.engine.max_model_len == 12
    with pytest.raises(InvalidInputError, match=r"prompt 0: the prompt has \d+ tokens but max"):
        llm.embed(LONG)
    with pytest.raises(InvalidInputError, match="max_seq_length=12"):
        LLM(path, dtype="float32", device="cpu", max_model_len=20)


def test_truncate_prompt_tokens_cuts_as_sentence_transformers(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_st_dense"))
    llm, model = LLM(path, dtype="float32", device="cpu"), st.SentenceTransformer(path)
    model.max_seq_length = 7  # the tokenizer's cut: the first 7 tokens
    want = model.encode([LONG, "hello world"], convert_to_tensor=True)
    outs = llm.embed([LONG, "hello world"], truncate_prompt_tokens=7)
    assert close(vectors(outs), want)
    assert outs[0].prompt_token_ids == llm.tokenizer.encode(LONG)[:7]
    ids = list(range(5, 40))  # token ids: the first k kept too
    cut = llm.embed({"prompt_token_ids": ids}, PoolingParams(truncate_prompt_tokens=9))[0]
    assert cut.prompt_token_ids == ids[:9]
    assert cut.outputs.embedding == llm.embed([ids[:9]])[0].outputs.embedding
    whole = llm.embed([ids], truncate_prompt_tokens=-1)[0]  # -1: max_model_len (128)
    assert whole.prompt_token_ids == ids
    with pytest.raises(InvalidInputError, match="greater than max_model_len=128"):
        llm.embed([ids], truncate_prompt_tokens=129)
    for bad in (0, -2, 1.5):
        with pytest.raises(InvalidInputError, match="truncate_prompt_tokens must be"):
            llm.embed("x", truncate_prompt_tokens=bad)


def test_dimensions_cut_a_matryoshka_model_and_renormalize(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_st_mean", matryoshka_dimensions=[16, 32]))
    llm, model = LLM(path, dtype="float32", device="cpu"), st.SentenceTransformer(path)
    for size in (16, 32):
        want = model.encode(TEXTS[:3], convert_to_tensor=True, truncate_dim=size,
                            normalize_embeddings=True)  # fmt: skip
        got = vectors(llm.embed(TEXTS[:3], PoolingParams(dimensions=size)))
        assert close(got, want)
    with pytest.raises(InvalidInputError, match=r"supports the matryoshka dimensions \[16, 32\]"):
        llm.embed("x", PoolingParams(dimensions=20))
    with pytest.raises(InvalidInputError, match="dimensions applies to task 'embed'"):
        llm.encode("x", PoolingParams(dimensions=16))
    free = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_st_mean", is_matryoshka=True)),
               dtype="float32", device="cpu")  # fmt: skip
    assert len(free.embed("x", PoolingParams(dimensions=20))[0].outputs.embedding) == 20
    with pytest.raises(InvalidInputError, match="exceeds the embedding size 64"):
        free.embed("x", PoolingParams(dimensions=65))
    plain = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_st_mean")), dtype="float32",
                device="cpu")  # fmt: skip
    with pytest.raises(InvalidInputError, match="dimensions: .* does not support matryoshka"):
        plain.embed("x", PoolingParams(dimensions=16))
