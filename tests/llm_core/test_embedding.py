"""BERT embedding models (`BertModel` checkpoints, task embed): vectors equal
sentence-transformers' `encode` (when installed) and transformers' `BertModel` + the declared
pooling by hand, within 1e-5; the pooling read from modules.json (`pooling_config.py`); the
cosine-similarity score; task errors."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from polymodal import InvalidInputError
from polymodal.llm import LLM
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import UnsupportedModelError
from polymodal.llm_core.pooling import PoolingParams
from polymodal.llm_core.pooling_config import PoolingConfig, load_pooling_config
from tests.helpers import tiny_checkpoint

TEXTS = ["the cat sat on the mat", "hello world", "a quick brown fox jumps over the dog", "x"]
IDS = [[1, 5, 17, 42, 99, 3, 2], list(range(5, 70))]
TOL = 1e-5
# tiny checkpoint -> (pooler, normalized by default) it declares
CHECKPOINTS = {
    "bert_st_mean": ("mean", True),  # modules.json: mean pooling + Normalize
    "bert_st_cls": ("cls", False),  # modules.json: CLS pooling, no Normalize
    "bert_embed": ("cls", True),  # no sentence-transformers files: vLLM's BERT default
}


def by_hand(path, ids: list[int], pooler: str, normalize: bool) -> torch.Tensor:
    """transformers' BertModel + the pooling written out: CLS row or mean, then L2 norm."""
    hf = tf.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([ids])).last_hidden_state[0]  # [tokens, hidden]
    vector = hidden[0] if pooler == "cls" else hidden.mean(0)
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def embedder(request, tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, request.param))
    return path, LLM(path, dtype="float32", device="cpu"), *CHECKPOINTS[request.param]


def test_embeddings_match_transformers_with_the_declared_pooling(embedder):
    path, llm, pooler, normalize = embedder
    outs = llm.embed([*TEXTS, *({"prompt_token_ids": ids} for ids in IDS)])
    prompts = [llm.tokenizer.encode(t) for t in TEXTS] + IDS
    for out, ids in zip(outs, prompts):
        assert out.prompt_token_ids == ids
        got = torch.tensor(out.outputs.embedding)
        assert (got - by_hand(path, ids, pooler, normalize)).abs().max() <= TOL
        assert (abs(got.norm() - 1) < 1e-5) == normalize


def test_embeddings_equal_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    path, llm, _, _ = embedder
    if not (Path(path) / "modules.json").is_file():
        pytest.skip("no modules.json: sentence-transformers would guess mean pooling")
    model = st.SentenceTransformer(path, device="cpu")
    want = model.encode(TEXTS, convert_to_tensor=True)  # padded batch with attention mask
    got = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert got.shape == want.shape and (got - want.cpu()).abs().max() <= TOL


def test_normalize_and_encode_override_the_checkpoint(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_st_mean"))
    llm = LLM(path, dtype="float32", device="cpu")
    ids = llm.tokenizer.encode(TEXTS[0])
    raw = by_hand(path, ids, "mean", False)
    plain = llm.embed(TEXTS[0], PoolingParams(normalize=False))[0].outputs.embedding
    assert (torch.tensor(plain) - raw).abs().max() <= TOL
    assert (llm.encode(TEXTS[0])[0].outputs.data - raw).abs().max() <= TOL  # pooled, as is
    cls = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_st_cls")), dtype="float32", device="cpu")
    unit = cls.embed(TEXTS[0], PoolingParams(normalize=True))[0].outputs.embedding
    assert abs(torch.tensor(unit).norm() - 1) < 1e-6


def test_batched_equals_alone_and_prompts_run_whole(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_st_mean"))
    engine = Engine(path, dtype="float32", device="cpu", max_num_batched_tokens=70)
    ids = [engine.add_request(p, PoolingParams()) for p in [*IDS, [7, 8, 9]]]
    batched = engine.run_until_done()
    for p, rid in zip([*IDS, [7, 8, 9]], ids):
        alone = Engine(path, dtype="float32", device="cpu")
        one = alone.add_request(p, PoolingParams())
        got = alone.run_until_done()[one].outputs.data
        assert torch.allclose(batched[rid].outputs.data, got, atol=1e-6)


def test_checkpoint_with_bert_prefix_and_pooler_loads(tmp_path_factory, tmp_path):
    """A BertModel checkpoint saved from a task model (`bert.` names, the tanh pooler) loads
    as the same embedding model."""
    src = tiny_checkpoint(tmp_path_factory, "bert_st_mean")
    for f in src.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
        else:
            (tmp_path / f.name).mkdir()
            for g in f.iterdir():
                (tmp_path / f.name / g.name).write_bytes(g.read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    weights = {f"bert.{k}": v for k, v in weights.items() if not k.startswith("pooler.")}
    weights["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    weights["cls.predictions.bias"] = torch.zeros(8)
    save_file(weights, str(tmp_path / "model.safetensors"))
    want = LLM(str(src), dtype="float32", device="cpu").embed(IDS[0])[0].outputs.embedding
    got = LLM(str(tmp_path), dtype="float32", device="cpu").embed(IDS[0])[0].outputs.embedding
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


# ---- score: cosine similarity ---------------------------------------------------------------
def test_score_is_the_cosine_similarity_of_the_embeddings(tmp_path_factory):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_st_cls")), dtype="float32", device="cpu")
    query, docs = TEXTS[0], TEXTS[1:]
    vectors = {t: torch.tensor(o.outputs.embedding) for t, o in zip(TEXTS, llm.embed(TEXTS))}
    outs = llm.score(query, docs)
    assert [type(o).__name__ for o in outs] == ["ScoringRequestOutput"] * 3
    pad = llm.tokenizer.pad_token_id
    for doc, out in zip(docs, outs):
        want = torch.nn.functional.cosine_similarity(vectors[query], vectors[doc], dim=0)
        assert abs(out.outputs.score - float(want)) <= TOL
        ids = llm.tokenizer.encode(query) + [pad] + llm.tokenizer.encode(doc)
        assert out.prompt_token_ids == ids
    pairwise = llm.score(docs, docs[::-1])
    assert abs(pairwise[1].outputs.score - 1) < 1e-5  # docs[1] against itself
    with pytest.raises(InvalidInputError, match="text_1 has 2 texts and text_2 3"):
        llm.score(docs[:2], docs)


# ---- tasks ----------------------------------------------------------------------------------
def test_embedding_model_serves_embed_and_encode_only(tmp_path_factory):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_embed")), dtype="float32", device="cpu")
    assert llm.engine.task == "embed" and llm.engine.scheduler.kv.specs == []
    with pytest.raises(InvalidInputError, match=r"serves the pooling task 'embed'.*'classify'"):
        llm.classify(TEXTS[0])
    with pytest.raises(InvalidInputError, match=r"pooling model \(task 'embed'\)"):
        llm.generate(TEXTS[0])


# ---- modules.json -------------------------------------------------------------------------
def _st_dir(tmp_path, pooling: dict, extra_modules=(), normalize=True):
    st = "sentence_transformers.models."
    modules = [
        {"path": "", "type": st + "Transformer"},
        {"path": "1_Pooling", "type": st + "Pooling"},
    ]
    modules += [{"path": "2_Normalize", "type": st + "Normalize"}] if normalize else []
    modules += [{"path": f"x_{m}", "type": st + m} for m in extra_modules]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir(exist_ok=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


DEFAULT = PoolingConfig(("cls",), True, "default")


@pytest.mark.parametrize(
    "pooling, normalize, modes",
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, True, ("mean",)),
        ({"pooling_mode_cls_token": True}, False, ("cls",)),
        ({"pooling_mode": "lasttoken"}, True, ("lasttoken",)),  # sentence-transformers 5+ format
        ({"pooling_mode": ["cls"]}, True, ("cls",)),
        ({"word_embedding_dimension": 64}, False, ("mean",)),  # none set: its default, mean
        # several: concatenated, legacy flags in sentence-transformers' order
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, True, ("cls", "mean")),
        ({"pooling_mode": ["weightedmean", "max"]}, False, ("weightedmean", "max")),
    ],
)
def test_pooling_config_from_modules_json(tmp_path, pooling, normalize, modes):
    got = load_pooling_config(_st_dir(tmp_path, pooling, normalize=normalize), DEFAULT)
    assert (got.modes, got.normalize, got.dense) == (modes, normalize, ())


def test_pooling_config_defaults_and_refusals(tmp_path):
    assert load_pooling_config(tmp_path, DEFAULT) is DEFAULT  # no modules.json
    bad = {
        "mode": ({"pooling_mode": "median"}, (), r"pooling mode 'median' is not supported"),
        "prompt": ({"pooling_mode": "mean", "include_prompt": False}, (), "include_prompt"),
        "other": ({"pooling_mode": "mean"}, ("WordWeights",), r"\['WordWeights'\] are not"),
    }
    for name, (pooling, extra, message) in bad.items():
        (tmp_path / name).mkdir()
        with pytest.raises(UnsupportedModelError, match=message):
            load_pooling_config(_st_dir(tmp_path / name, pooling, extra), DEFAULT)
    (tmp_path / "dense").mkdir()
    dense = _st_dir(tmp_path / "dense", {"pooling_mode": "mean"}, normalize=False)
    (dense / "2_Dense").mkdir()
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    config = {"in_features": 64, "out_features": 8, "activation_function": "my.Activation"}
    (dense / "2_Dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"2_Dense/config.json: activation_function"):
        load_pooling_config(dense, DEFAULT)
    modules.insert(1, modules.pop())  # Dense before Pooling
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="in the order"):
        load_pooling_config(dense, DEFAULT)


def test_unsupported_pooling_fails_at_load_naming_the_file(tmp_path_factory, tmp_path):
    src = tiny_checkpoint(tmp_path_factory, "bert_embed")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _st_dir(tmp_path, {"pooling_mode": "median"})
    with pytest.raises(UnsupportedModelError, match=r"1_Pooling/config.json: pooling mode 'med"):
        Engine(str(tmp_path), dtype="float32", device="cpu")
