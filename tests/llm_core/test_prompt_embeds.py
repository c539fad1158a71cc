"""Prompts given as embeddings (vLLM's `prompt_embeds`, `enable_prompt_embeds=True`): greedy
tokens and logprobs equal transformers' `generate(inputs_embeds=...)` on the same rows (Llama,
Gemma 3 with its scaled token embeddings, Qwen2-VL with M-RoPE and staging), batched with token
prompts, chunked, cached and truncated; the repetition penalty counts the output only, as in
transformers; every bad input is refused with its reason."""

import pytest
import torch
import transformers as tf

from polymodal import LLM
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint

STEPS = 8


def _hf(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _random_rows(hf, n: int, seed: int) -> torch.Tensor:
    """Rows at the scale of the model's token embeddings, but of no token."""
    scale = hf.get_input_embeddings().weight.std().item()
    return torch.randn(n, hf.config.get_text_config().hidden_size,
                       generator=torch.Generator().manual_seed(seed)) * scale  # fmt: skip


def _hf_generate(hf, rows: torch.Tensor, **kwargs) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens from `inputs_embeds` and each chosen token's logprob."""
    with torch.no_grad():
        out = hf.generate(inputs_embeds=rows[None], max_new_tokens=STEPS, do_sample=False,
                          min_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, **kwargs)  # fmt: skip
    tokens = out.sequences[0, -STEPS:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, logprobs


def _llm(path, **kwargs):
    kwargs = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 128, **kwargs}
    return LLM(str(path), enable_prompt_embeds=True, **kwargs)


def _params(**kwargs):
    return SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=0, **kwargs)


def _check(out, want: tuple[list[int], list[float]]):
    tokens, logprobs = want
    got = out.outputs[0]
    assert got.token_ids == tokens
    chosen = [table[t] for table, t in zip(got.logprobs, got.token_ids)]
    chosen = [getattr(c, "logprob", c) for c in chosen]
    assert max(abs(a - b) for a, b in zip(chosen, logprobs)) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2_vl"])
def test_equal_transformers_inputs_embeds(tmp_path_factory, arch):
    """Random rows and rows of real tokens, with a token prompt in the same batch; whole and
    in chunks of 8 tokens across steps."""
    path = tiny_checkpoint(tmp_path_factory, arch)
    hf = _hf(path) if arch != "qwen2_vl" else tf.AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32).eval()  # fmt: skip
    ids = tf.AutoTokenizer.from_pretrained(path).encode("a cat sat on the mat by the door")
    with torch.no_grad():
        token_rows = hf.get_input_embeddings()(torch.tensor(ids))
    cases = [_random_rows(hf, 21, 0), token_rows]
    wants = [_hf_generate(hf, rows) for rows in cases]
    for budget in (None, 8):
        llm = _llm(path, max_num_batched_tokens=budget)
        prompts = [{"prompt_embeds": rows} for rows in cases] + [ids]
        outs = llm.generate(prompts, _params())
        for out, want in zip(outs, wants):
            _check(out, want)
            assert out.prompt_token_ids is None  # vLLM's: no token ids for an embeds prompt
            assert out.usage.prompt_tokens in (21, len(ids))
            text = llm.tokenizer.decode(out.outputs[0].token_ids)
            assert out.outputs[0].text == text
        # the token prompt and the same tokens' rows are one model input
        assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
        assert outs[2].prompt_token_ids == ids
        assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_cached_truncated_and_penalized(tmp_path_factory):
    """A repeated embeds prompt reuses its blocks (the rows' hash keys them; other rows never
    do); truncate_prompt_tokens keeps the last rows; repetition_penalty sees the output only."""
    path = tiny_checkpoint(tmp_path_factory, "llama")
    hf = _hf(path)
    rows = _random_rows(hf, 40, 1)
    llm = _llm(path)
    first = llm.generate({"prompt_embeds": rows}, _params())[0]
    again = llm.generate({"prompt_embeds": rows.clone()}, _params())[0]
    assert again.num_cached_tokens >= 32 and first.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = rows.clone()
    other[3] += 1.0  # one row differs: no block of this prompt is shared
    assert llm.generate({"prompt_embeds": other}, _params())[0].num_cached_tokens == 0

    cut = llm.generate({"prompt_embeds": rows}, _params(truncate_prompt_tokens=13))[0]
    _check(cut, _hf_generate(hf, rows[-13:]))
    assert cut.usage.prompt_tokens == 13

    penalized = llm.generate({"prompt_embeds": rows}, _params(repetition_penalty=1.5))[0]
    _check(penalized, _hf_generate(hf, rows, repetition_penalty=1.5))


def test_bad_inputs_refused(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    hidden = tf.AutoConfig.from_pretrained(path).hidden_size
    rows = torch.randn(5, hidden)
    off = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64)
    with pytest.raises(InvalidInputError, match="enable_prompt_embeds=True"):
        off.generate({"prompt_embeds": rows})
    llm = _llm(path, num_kv_blocks=64)
    cases = {
        "must be a torch.Tensor": [[0.0] * hidden],
        "shape \\[num_tokens, hidden_size\\]": torch.randn(2, 3, hidden),
        "num_tokens >= 1": torch.randn(0, hidden),
        "floating-point": torch.ones(4, hidden, dtype=torch.int64),
        "NaN or infinite": torch.full((3, hidden), float("nan")),
        f"hidden size is {hidden}": torch.randn(4, hidden + 1),
    }
    for message, value in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            llm.generate({"prompt_embeds": value})
    with pytest.raises(InvalidInputError, match="prompt_logprobs need prompt tokens"):
        llm.generate({"prompt_embeds": rows}, SamplingParams(prompt_logprobs=1))
    with pytest.raises(InvalidInputError, match="takes no \\['multi_modal_data'\\]"):
        llm.generate({"prompt_embeds": rows, "multi_modal_data": {}})
    with pytest.raises(InvalidInputError, match="exactly one of"):
        llm.generate({"prompt_embeds": rows, "prompt": "hi"})
    from polymodal.beam_search import BeamSearchParams

    with pytest.raises(InvalidInputError, match="beam search takes token prompts"):
        llm.beam_search([{"prompt_embeds": rows}], BeamSearchParams(beam_width=2, max_tokens=2))
    # a batch-level [1, n, hidden] tensor is one prompt; the engine still serves others
    out = llm.generate([{"prompt_embeds": rows[None]}, [1, 2, 3]], _params())
    assert [len(o.outputs[0].token_ids) for o in out] == [STEPS, STEPS]
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


def test_encoder_decoder_and_pooling_refused(tmp_path_factory):
    whisper = tiny_checkpoint(tmp_path_factory, "whisper")
    llm = _llm(whisper, num_kv_blocks=64)
    rows = torch.randn(4, llm.model_config.hidden_size)
    with pytest.raises(InvalidInputError, match="encoder-decoder"):
        llm.generate({"prompt_embeds": rows})
    embed = tiny_checkpoint(tmp_path_factory, "qwen3_embed")
    pooling = _llm(embed, num_kv_blocks=64)
    rows = torch.randn(4, pooling.model_config.hidden_size)
    with pytest.raises(InvalidInputError, match="not to pooling requests"):
        pooling.embed({"prompt_embeds": rows})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl"])
def test_gpu_embeds_of_tokens_decode_as_tokens(tmp_path_factory, arch):
    """On CUDA (bf16, decode graphs, a VL model's staging): a prompt given as its tokens' own
    embeddings gives the token prompt's greedy tokens, batched with it and alone."""
    path = tiny_checkpoint(tmp_path_factory, arch)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", enable_prompt_embeds=True)
    ids = llm.tokenizer.encode("a cat sat on the mat by the door " * 6)
    table = llm.engine.runner.model.model.embed_tokens.weight
    rows = table[torch.tensor(ids, device=table.device)].float().cpu()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = llm.generate([ids], params)[0].outputs[0].token_ids
    together = llm.generate([{"prompt_embeds": rows}, ids], params)
    assert [o.outputs[0].token_ids for o in together] == [want, want]
    assert llm.generate({"prompt_embeds": rows}, params)[0].outputs[0].token_ids == want
