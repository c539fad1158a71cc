"""`LLM` as a vLLM user calls it: prompt forms (multi_modal_data, mm_processor_kwargs, token
ids), `chat` options, `limit_mm_per_prompt`, `use_tqdm`, generation_config.json defaults, and
an error naming every keyword it does not support."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from polymodal import LLM, InvalidInputError, SamplingParams
from tests.helpers import tiny_checkpoint

MARK = "<|vision_start|><|image_pad|><|vision_end|>"
VMARK = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _image(seed=1, w=84, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)


def run(llm, prompt, params=GREEDY):
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    return out.prompt_token_ids, out.outputs[0].token_ids


def test_vllm_prompt_forms_equal_the_native_forms(llm, ckpt):
    img = _image()
    native = run(llm, {"prompt": MARK + "What?", "images": [img]})
    assert run(llm, {"prompt": MARK + "What?", "multi_modal_data": {"image": img}}) == native
    assert run(llm, {"prompt": MARK + "What?", "multi_modal_data": {"image": [img]}}) == native
    ids = llm.tokenizer.encode(MARK + "What?", add_special_tokens=False)
    by_ids = {"prompt_token_ids": ids, "multi_modal_data": {"image": img}}
    assert run(llm, by_ids) == native
    small = {"prompt": MARK + "What?", "images": [img], "max_pixels": 56 * 56}
    vllm_small = {
        "prompt": MARK + "What?",
        "multi_modal_data": {"image": img},
        "mm_processor_kwargs": {"max_pixels": 56 * 56},
    }
    assert run(llm, vllm_small) == run(llm, small)
    assert len(run(llm, small)[0]) < len(native[0])
    frames = [_image(10 + i) for i in range(4)]
    video = {"prompt": VMARK + "Go", "multi_modal_data": {"video": frames}}
    assert run(llm, video) == run(llm, {"prompt": VMARK + "Go", "videos": [frames]})
    as_array = {"prompt": VMARK + "Go", "multi_modal_data": {"video": np.stack(frames)}}
    assert run(llm, as_array) == run(llm, video)
    # vLLM's media_io_kwargs: the video loader's frame count, as mm_processor_kwargs sets it
    few = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128,
              media_io_kwargs={"video": {"num_frames": 2}})  # fmt: skip
    assert run(few, video) == run(llm, {**video, "mm_processor_kwargs": {"num_frames": 2}})
    assert few.media_defaults == {"num_frames": 2}  # its effect on a clip: test_server_fields


def test_bad_prompts_and_keywords_are_named(llm, ckpt):
    with pytest.raises(InvalidInputError, match="'multimodal_data'"):
        llm.generate({"prompt": "x", "multimodal_data": {}})
    with pytest.raises(InvalidInputError, match="takes no audio input: it has no audio encoder"):
        llm.generate({"prompt": "x", "multi_modal_data": {"audio": b""}})
    with pytest.raises(InvalidInputError, match="'speech'"):
        llm.generate({"prompt": "x", "multi_modal_data": {"speech": b""}})
    with pytest.raises(InvalidInputError, match="'resize'"):
        llm.generate({"prompt": "x", "mm_processor_kwargs": {"resize": 1}})
    with pytest.raises(InvalidInputError, match="audio.sample_rate"):
        LLM(ckpt, device="cpu", media_io_kwargs={"audio": {"sample_rate": 8000}})
    with pytest.raises(InvalidInputError, match=r"\['fps'\] set twice"):
        LLM(ckpt, device="cpu", mm_processor_kwargs={"fps": 1},
            media_io_kwargs={"video": {"fps": 2}})  # fmt: skip
    with pytest.raises(InvalidInputError, match="'swap_spaec', 'lora'"):
        LLM(ckpt, device="cpu", swap_spaec=4, lora=True)
    with pytest.raises(InvalidInputError, match="tensor_parallel_size=3 does not divide"):
        LLM(ckpt, device="cpu", tensor_parallel_size=3)
    with pytest.raises(InvalidInputError, match="pipeline_parallel_size=2"):
        LLM(ckpt, device="cpu", pipeline_parallel_size=2)
    with pytest.raises(InvalidInputError, match="limit_mm_per_prompt"):
        LLM(ckpt, device="cpu", limit_mm_per_prompt={"speech": 1})
    with pytest.raises(InvalidInputError, match="not a pooling request"):
        llm.embed("hello")
    with pytest.raises(InvalidInputError, match="not a pooling request"):
        llm.classify("hello")
    with pytest.raises(InvalidInputError, match="a SamplingParams or a list of them, got dict"):
        llm.generate("hello", {"max_tokens": 2})  # a dict of one key was read as one params


def test_vllm_keywords_limits_and_progress(ckpt, capsys):
    llm = LLM(
        ckpt, device="cpu", dtype="float", enforce_eager=True, trust_remote_code=True, seed=3,
        tensor_parallel_size=1, limit_mm_per_prompt={"image": 1}, num_kv_blocks=64,
    )  # fmt: skip
    assert llm.engine.config.cuda_graphs is False
    with pytest.raises(InvalidInputError, match="2 image items but limit_mm_per_prompt allows 1"):
        llm.generate({"prompt": MARK * 2, "images": [_image(1), _image(2)]})
    llm.generate(["a", "b"], GREEDY)  # use_tqdm defaults to True, as in vLLM
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate(["a", "b"], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_chat_options(llm):
    img = _image()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}],
        }
    ]
    base = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    as_dict = llm.generate({"messages": messages}, GREEDY, use_tqdm=False)[0]
    assert base.outputs[0].token_ids == as_dict.outputs[0].token_ids
    numbered = llm.chat(
        messages, GREEDY, use_tqdm=False, chat_template_kwargs={"add_vision_id": True}
    )
    assert len(numbered[0].prompt_token_ids) > len(base.prompt_token_ids)
    no_gen = llm.chat(messages, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert len(no_gen[0].prompt_token_ids) < len(base.prompt_token_ids)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = llm.chat(messages, GREEDY, use_tqdm=False, tools=tools)
    assert "# Tools" in llm.tokenizer.decode(with_tools[0].prompt_token_ids)
    template = "{% for m in messages %}{{ m['content'][1]['text'] }}{% endfor %}"
    with pytest.raises(InvalidInputError, match="0 image placeholders"):
        llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)
    small = llm.chat(messages, GREEDY, use_tqdm=False, mm_processor_kwargs={"max_pixels": 3136})
    assert len(small[0].prompt_token_ids) < len(base.prompt_token_ids)
    two = llm.chat([messages, messages], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [base.outputs[0].token_ids] * 2


def test_generation_config_defaults(tmp_path, ckpt):
    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(temperature=0.7, top_k=1, repetition_penalty=1.0, max_new_tokens=5)
    (model / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(model), device="cpu", num_kv_blocks=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.7, 1, 5)
    outs = llm.generate(["Once upon", "Once upon"], use_tqdm=False)  # top_k=1: the argmax
    greedy = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=5), False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    plain = LLM(str(model), device="cpu", num_kv_blocks=64, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    short = LLM(str(model), device="cpu", num_kv_blocks=64,
                override_generation_config={"max_new_tokens": 2})  # fmt: skip
    assert short.get_default_sampling_params().max_tokens == 2


def test_vllm_top_level_names_import():
    """`from vllm import ...` as users write it works with polymodal in its place."""
    import polymodal

    names = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput",
             "PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput",
             "ScoringRequestOutput", "PoolingOutput", "EmbeddingOutput", "ClassificationOutput",
             "ScoringOutput"]  # fmt: skip
    assert set(names) <= set(polymodal.__all__)
    assert all(getattr(polymodal, name) is not None for name in polymodal.__all__)


def test_detokenize_false_gives_the_same_tokens_without_text(llm):
    """`detokenize=False` (vLLM's): the same token ids (and logprobs), no text; with stop
    strings it is refused naming the field."""
    prompt = {"prompt": MARK + "What?", "images": [_image()]}
    params = dict(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    with_text = llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    ids_only = llm.generate(prompt, SamplingParams(**params, detokenize=False), use_tqdm=False)
    out = ids_only[0].outputs[0]
    assert with_text.text and out.text == ""
    assert out.token_ids == with_text.token_ids and out.logprobs == with_text.logprobs
    with pytest.raises(InvalidInputError, match="detokenize must be True with stop strings"):
        SamplingParams(stop=["."], detokenize=False)


def test_cache_salt_keeps_prefix_hits_within_a_salt(ckpt):
    """vLLM's `cache_salt`: the same prompt hits the prefix cache only under the same salt (or
    none); a bad salt is named."""
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128, enable_prefix_caching=True)
    kv = llm.engine.scheduler.kv
    text = "A long shared system prompt that fills several blocks of the KV cache. " * 4

    def hit(**salt) -> int:
        before = kv.num_hit_tokens
        out = llm.generate({"prompt": text, **salt}, GREEDY, use_tqdm=False)[0]
        return kv.num_hit_tokens - before, out.outputs[0].token_ids

    first, tokens = hit()
    assert first == 0 and hit()[0] > 0
    assert hit(cache_salt="tenant-a") == (0, tokens)  # another tenant: no hit, same answer
    assert hit(cache_salt="tenant-a")[0] > 0
    assert hit(cache_salt="tenant-b")[0] == 0
    with pytest.raises(InvalidInputError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt": text, "cache_salt": ""}, GREEDY, use_tqdm=False)


def test_vllm_keywords_without_an_effect_are_taken_and_logged(ckpt, caplog):
    """`swap_space`, `max_seq_len_to_capture`, `disable_custom_all_reduce`, `disable_log_stats`:
    taken (vLLM v1 scripts pass them), each logged with what polymodal does instead;
    `enable_chunked_prefill=False` is refused."""
    import logging

    with caplog.at_level(logging.INFO, logger="polymodal"):
        llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=32, swap_space=16,
                  max_seq_len_to_capture=8192, disable_custom_all_reduce=True,
                  disable_log_stats=True, enable_chunked_prefill=True)  # fmt: skip
    assert "swap_space=16) has no effect: preempted requests are recomputed" in caplog.text
    assert "max_seq_len_to_capture" in caplog.text and "disable_log_stats" in caplog.text
    assert run(llm, "Hello")[1]
    with pytest.raises(InvalidInputError, match="enable_chunked_prefill=False"):
        LLM(ckpt, device="cpu", enable_chunked_prefill=False)
