"""BAAI/bge-m3's lexical weights (task token_classify) and ColBERT vectors (task token_embed)
(`models/bge_m3.py`) against a reference written from FlagEmbedding's `BGEM3FlagModel`
semantics (its m3 inference code: relu(sparse_linear(h)) folded per token id by max, skipping
the tokenizer's cls / eos / pad / unk ids and weights <= 0; colbert_linear(h[:, 1:]) of the
real tokens, L2-normalized), run on transformers' `XLMRobertaModel` with the same tiny weights,
padded as FlagEmbedding batches; batched prompts equal each alone; missing head files and bad
requests raise errors naming them."""

from pathlib import Path

import pytest
import torch
import transformers as tf

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.models.bge_m3 import lexical_weights
from polymodal.llm_core.pooling import PoolingParams
from tests.helpers import tiny_checkpoint

# config.json: bos 0 (also the pad token), eos 2; prompts as bge-m3's tokenizer makes them
# (BOS ... EOS), one with a repeated token and a pad token inside, one without special tokens
IDS = [
    [0, 50, 60, 70, 2],
    [0, 81, 90, 81, 0, 120, 81, 2],
    [0, *range(200, 260), 2],
    [33, 44, 55],
]
TOL = 1e-5


@pytest.fixture(scope="module")
def bge_m3(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "xlm_roberta_embed")
    return path, LLM(str(path), dtype="float32", device="cpu")


def flag_reference(path: Path, prompts: list[list[int]]):
    """(lexical weights, ColBERT vectors) per prompt, as BGEM3FlagModel computes them on a
    padded batch (normalize_embeddings=True)."""
    hf = tf.XLMRobertaModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    hidden = hf.config.hidden_size
    sparse, colbert = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, hidden)
    sparse.load_state_dict(torch.load(path / "sparse_linear.pt", weights_only=True))
    colbert.load_state_dict(torch.load(path / "colbert_linear.pt", weights_only=True))
    unused = {
        tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[role])
        for role in ("cls_token", "eos_token", "pad_token", "unk_token")
        if role in tokenizer.special_tokens_map
    }
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [tokenizer.pad_token_id] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = torch.relu(sparse(states)).squeeze(-1)  # [batch, longest]
        vectors = colbert(states[:, 1:]) * mask[:, 1:, None].float()
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    lexical, multi = [], []
    for row, prompt in enumerate(prompts):
        folded: dict[int, float] = {}
        for token, weight in zip(prompt, weights[row, : len(prompt)].tolist()):
            if token not in unused and weight > folded.get(token, 0.0):
                folded[token] = weight
        lexical.append(folded)
        multi.append(vectors[row, : len(prompt) - 1])
    return lexical, multi


def assert_same_lexical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    assert all(abs(got[t] - want[t]) <= TOL for t in want)


def test_lexical_weights_and_colbert_match_flag_embedding(bge_m3):
    path, llm = bge_m3
    want_lexical, want_colbert = flag_reference(path, IDS)
    weights = llm.encode(IDS, pooling_task="token_classify")
    vectors = llm.encode(IDS, PoolingParams(task="token_embed"))
    for prompt, w, v, lexical, colbert in zip(IDS, weights, vectors, want_lexical, want_colbert):
        # vLLM's rows: BOS and EOS dropped from the weights, BOS from the vectors
        bos, eos = prompt[0] == 0, prompt[-1] == 2
        assert w.outputs.data.shape == (len(prompt) - bos - eos,)
        assert_same_lexical(lexical_weights(prompt, w.outputs.data, llm.tokenizer), lexical)
        # FlagEmbedding drops the first token's vector whatever it is; vLLM only a BOS
        got = v.outputs.data if bos else v.outputs.data[1:]
        assert v.outputs.data.shape[0] == len(prompt) - bos
        assert got.shape == colbert.shape and (got - colbert).abs().max() <= TOL
    assert any(want_lexical) and 81 in want_lexical[1]  # the fold saw a repeated token


def test_batched_equals_alone_and_dense_still_served(bge_m3):
    path, llm = bge_m3
    for task in ("token_classify", "token_embed"):
        together = llm.encode(IDS, pooling_task=task)
        for prompt, out in zip(IDS, together):
            alone = llm.encode([prompt], pooling_task=task)[0]
            assert (out.outputs.data - alone.outputs.data).abs().max() <= TOL
    hf = tf.XLMRobertaModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        cls = hf(torch.tensor([IDS[0]])).last_hidden_state[0, 0]
    dense = torch.tensor(llm.embed([IDS[0]])[0].outputs.embedding)
    assert (dense - torch.nn.functional.normalize(cls, dim=-1)).abs().max() <= TOL


def test_request_options(bge_m3):
    path, llm = bge_m3
    raw = llm.encode([IDS[0]], PoolingParams(task="token_embed", normalize=False))[0]
    unit = llm.encode([IDS[0]], pooling_task="token_embed")[0]
    norms = raw.outputs.data.norm(dim=-1, keepdim=True)
    assert (raw.outputs.data / norms - unit.outputs.data).abs().max() <= TOL
    pre = llm.encode([IDS[1]], PoolingParams(task="token_classify", activation=False))[0]
    relu = llm.encode([IDS[1]], pooling_task="token_classify")[0]
    assert (pre.outputs.data.clamp(min=0) - relu.outputs.data).abs().max() <= TOL
    with pytest.raises(InvalidInputError, match="dimensions applies to task 'embed'"):
        llm.encode([IDS[0]], PoolingParams(task="token_embed", dimensions=8))


def test_architecture_override_and_missing_head_files(bge_m3, tmp_path):
    path, _ = bge_m3
    bare = tmp_path / "no_heads"
    bare.mkdir()
    for item in path.iterdir():
        if item.suffix != ".pt":
            (bare / item.name).symlink_to(item)
    # vLLM's switch: hf_overrides={"architectures": ["BgeM3EmbeddingModel"]}
    llm = LLM(
        str(bare), dtype="float32", device="cpu",
        hf_overrides={"architectures": ["BgeM3EmbeddingModel"]},
    )  # fmt: skip
    assert llm.model_config.architecture == "BgeM3EmbeddingModel"
    assert len(llm.embed([IDS[0]])[0].outputs.embedding) == 64
    heads = (("token_classify", "sparse_linear.pt"), ("token_embed", "colbert_linear.pt"))
    for task, file in heads:
        with pytest.raises(InvalidInputError, match=f"task '{task}' needs {file}"):
            llm.encode([IDS[0]], pooling_task=task)
    with pytest.raises(InvalidInputError, match="only 'architectures' is supported, not 'x'"):
        Engine(str(path), dtype="float32", device="cpu", hf_overrides={"x": 1})


def test_models_without_token_heads_refuse_token_tasks(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "roberta_embed")
    llm = LLM(str(path), dtype="float32", device="cpu")
    with pytest.raises(InvalidInputError, match="not 'token_embed': it has no per-token head"):
        llm.encode([[5, 6, 7]], pooling_task="token_embed")
    with pytest.raises(InvalidInputError, match="pooling task must be one of"):
        PoolingParams(task="sparse")


def test_bad_head_file_is_named(bge_m3, tmp_path):
    path, _ = bge_m3
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in path.iterdir():
        if item.name != "sparse_linear.pt":
            (broken / item.name).symlink_to(item)
    torch.save({"weight": torch.zeros(1, 7)}, broken / "sparse_linear.pt")
    with pytest.raises(Exception, match=r"sparse_linear.pt: weight has shape \(1, 7\)"):
        Engine(str(broken), dtype="float32", device="cpu")


def test_config_naming_the_architecture_equals_the_override(bge_m3, tmp_path_factory):
    """A checkpoint whose config.json names `BgeM3EmbeddingModel` (the tiny `bge_m3` fixture:
    the same tensors as `xlm_roberta_embed`) serves the same three outputs as the override."""
    path, llm = bge_m3
    named = LLM(str(tiny_checkpoint(tmp_path_factory, "bge_m3")), dtype="float32", device="cpu")
    assert named.model_config.architecture == "BgeM3EmbeddingModel"
    for task in ("embed", "token_classify", "token_embed"):
        want = llm.encode(IDS, pooling_task=task)
        got = named.encode(IDS, pooling_task=task)
        for a, b in zip(got, want):
            assert torch.equal(a.outputs.data, b.outputs.data), task
