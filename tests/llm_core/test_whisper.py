"""Whisper (audio encoder + decoder with cross-attention over the cross KV kind) vs transformers,
fp32 on the CPU, on a tiny checkpoint (5 s windows of 16 mel bins: 250 encoder rows):
- the decoder prompt equals `generate`'s forced ids (language, task, timestamps);
- greedy tokens equal `WhisperForConditionalGeneration.generate` (its suppress and
  begin-suppress rules from generation_config.json), fp32 logits within 1e-4 of the forward;
- several clips and tasks in one engine run, a decoder prompt without audio among them; chunked
  prefill; prefix hits; the decode and prefill graph step paths (eagerly).
One request is one window here; timestamps, language detection, long-form and the audio routes:
tests/sdk/test_speech.py."""

import numpy as np
import pytest
import torch
import transformers as tf

from polymodal import LLM, SamplingParams
from polymodal.processors.whisper import WhisperProcessor
from tests.helpers import record_logits_by_request, tiny_checkpoint

STEPS = 8
RATE = 16000


def clip(kind: str, seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    rng = np.random.default_rng(len(kind))
    waves = {
        "noise": rng.standard_normal(t.size) * 0.1,
        "tone": np.sin(2 * np.pi * 440 * t) * 0.5,
        "chirp": np.sin(2 * np.pi * (200 + 600 * t) * t) * 0.5,
        "short": np.sin(2 * np.pi * 300 * t[: RATE // 4]) * 0.3,
    }
    return waves[kind].astype(np.float32)


CASES = {  # name -> (clip, language, task, timestamps)
    "noise_en_transcribe": ("noise", "en", "transcribe", False),
    "tone_de_translate": ("tone", "de", "translate", False),
    "chirp_fr_default_task": ("chirp", "fr", None, False),
    "short_en_timestamps_prompt": ("short", "en", "transcribe", True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    hf = tf.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, tf.WhisperFeatureExtractor.from_pretrained(path)


@pytest.fixture(scope="module")
def llm(models):
    return LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=128)


def _features(models, name):
    return models[2](clip(CASES[name][0]), sampling_rate=RATE, return_tensors="pt").input_features


def _reference(models, name):
    """generate()'s forced prompt and greedy tokens, and the forward's raw logits per step."""
    _, hf, _ = models
    _, language, task, timestamps = CASES[name]
    features = _features(models, name)
    if timestamps:  # the timestamp rules are not ported: compare the decoder on its prompt
        prompt = WhisperProcessor.from_pretrained(models[0]).prompt_ids(language, task, True)
        tokens = None
    else:
        out = hf.generate(  # one window, one call (no seek past a timestamp pair)
            features, language=language, task=task, max_new_tokens=STEPS, do_sample=False,
            return_dict_in_generate=True, output_scores=True, force_unique_generate_call=True,
        )  # fmt: skip
        seq = out.sequences[0].tolist()
        prompt_len = len(seq) - len(out.scores)
        prompt, tokens = seq[:prompt_len], seq[prompt_len:]
    ids, logits = list(prompt), []
    gen = hf.generation_config
    for step in range(STEPS):  # re-forward the whole decoder prompt each step
        with torch.no_grad():
            row = hf(input_features=features, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        logits.append(row.float())
        masked = row.clone()
        masked[gen.suppress_tokens] = float("-inf")
        if step == 0:
            masked[gen.begin_suppress_tokens] = float("-inf")
        ids.append(int(masked.argmax()))
    return prompt, tokens if tokens is not None else ids[len(prompt) :], logits


def _prompt(name):
    kind, language, task, timestamps = CASES[name]
    options = {"language": language, "task": task, "timestamps": timestamps}
    return {"prompt": "", "multi_modal_data": {"audio": (clip(kind), RATE)},
            "mm_processor_kwargs": {k: v for k, v in options.items() if v is not None}}  # fmt: skip


def _params(llm):
    """The checkpoint's defaults (its suppress lists), greedy, no early stop."""
    defaults = llm.get_default_sampling_params()
    return defaults.model_copy(update={"temperature": 0.0, "max_tokens": STEPS, "ignore_eos": True})


def _check(llm, prompts, refs):
    seen = record_logits_by_request(llm.engine)
    ids = [llm.submit(p, _params(llm)) for p in prompts]
    final = {o.request_id: o for o in llm.run(ids)}
    for rid, (prompt, tokens, logits) in zip(ids, refs):
        out = final[rid]
        assert out.prompt_token_ids == prompt, "the forced decoder ids differ"
        assert out.outputs[0].token_ids == tokens[: len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) == STEPS or tokens[-1] == llm.tokenizer.eos_token_id
        for step, ref in enumerate(logits):
            diff = (seen[rid][step].cpu() - ref).abs().max().item()
            assert diff <= 1e-4, f"step {step}: max abs logit diff {diff:.2e}"


def test_the_tiny_checkpoint_is_not_vacuous(models):
    """Different audio moves the first logits far past the tolerance."""
    a = _reference(models, "noise_en_transcribe")[2][0]
    b = _reference(models, "tone_de_translate")[2][0]
    assert (a - b).abs().max() > 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_single_request_matches_transformers(models, llm, name):
    _check(llm, [_prompt(name)], [_reference(models, name)])


def test_batch_of_clips_and_tasks(models, llm):
    """Every case twice in one run, and a decoder prompt without audio (its cross layers
    skipped) alongside."""
    names = list(CASES) * 2
    proc = WhisperProcessor.from_pretrained(models[0])
    llm.submit(proc.prompt_ids("en", "transcribe"), SamplingParams(max_tokens=3))
    _check(llm, [_prompt(n) for n in names], [_reference(models, n) for n in names])
    assert not llm.engine.has_unfinished()  # the audio-less request ran with them
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


@pytest.mark.parametrize("budget", [1, 3])
def test_chunked_prefill(models, budget):
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=128,
              max_num_batched_tokens=budget)  # fmt: skip
    names = ["noise_en_transcribe", "tone_de_translate"]
    _check(llm, [_prompt(n) for n in names], [_reference(models, n) for n in names])


def test_prefix_hits_write_the_audio_rows_anew(models):
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=400, block_size=2)
    kv = llm.engine.scheduler.kv
    ref = _reference(models, "noise_en_transcribe")
    _check(llm, [_prompt("noise_en_transcribe")], [ref])
    hits = kv.num_hit_tokens
    _check(llm, [_prompt("noise_en_transcribe")], [ref])
    assert kv.num_hit_tokens > hits  # the decoder prompt's blocks are shared
    hits = kv.num_hit_tokens
    _check(llm, [_prompt("chirp_fr_default_task")], [_reference(models, "chirp_fr_default_task")])
    assert kv.num_hit_tokens == hits  # another clip: nothing shared


def test_graph_step_paths(models):
    """The decode and prefill graph inputs (cross tables, row counts, ranges), eagerly."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.prefill_graphs import PrefillGraphs

    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=128,
              max_num_batched_tokens=3)  # fmt: skip
    runner = llm.engine.runner
    groups = (runner.uses_mrope, runner.num_kv_groups, runner.num_cross_groups,
              runner.max_cross_blocks)  # fmt: skip
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 4, *groups)
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.kv_caches, 32, 4, *groups)
    names = list(CASES)
    _check(llm, [_prompt(n) for n in names], [_reference(models, n) for n in names])
    assert runner.graphs.runs > 0 and runner.prefill_graphs.runs > 0


def test_default_sampling_decodes_on_the_graph_path(models):
    """A request with the checkpoint's sampling defaults (suppress lists: logit rules) takes
    every decode step from the decode graph (eagerly here): the rules do not force eager steps
    and keep the step free of host reads (`needs_host_tokens` is False)."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs

    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=128)
    runner = llm.engine.runner
    groups = (runner.uses_mrope, runner.num_kv_groups, runner.num_cross_groups,
              runner.max_cross_blocks)  # fmt: skip
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 4, *groups)
    params = _params(llm)
    assert params.has_logit_rules and not params.needs_host_tokens
    name = "noise_en_transcribe"
    _check(llm, [_prompt(name)], [_reference(models, name)])
    assert runner.graphs.runs == STEPS - 1  # the first token comes from the prefill step


def test_processor_prompts_and_features(models):
    """The forced ids as `generate` builds them, and features equal to the extractor's."""
    proc = WhisperProcessor.from_pretrained(models[0])
    gen = models[1].generation_config
    lang, task = gen.lang_to_id, gen.task_to_id
    sot, notimestamps = gen.decoder_start_token_id, gen.no_timestamps_token_id
    assert proc.prompt_ids("en") == [sot, lang["<|en|>"], task["transcribe"], notimestamps]
    assert proc.prompt_ids("German", "translate", True) == [sot, lang["<|de|>"], task["translate"]]
    item = proc.audio_item((clip("chirp"), RATE))
    want = models[2](clip("chirp"), sampling_rate=RATE, return_tensors="pt").input_features[0]
    assert item.num_embeds == 250
    assert (item.data["input_features"] - want).abs().max() <= 1e-4
    assert proc.audio_item((clip("chirp"), RATE)).content_hash == item.content_hash
    assert proc.audio_item((clip("tone"), RATE)).content_hash != item.content_hash
    # precomputed features are taken as they are
    assert torch.equal(proc.audio_item(want).data["input_features"], want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"language": None}, "language= is required"),
        ({"language": "xx"}, "not one of this checkpoint's"),
        ({"language": "en", "task": "summarize"}, "task="),
        ({"language": "en", "audio": (np.zeros(RATE * 6, np.float32), RATE)}, "longer than"),
        ({"language": "en", "audio": (np.zeros(0, np.float32), RATE)}, "no audio samples"),
        ({"language": "en", "audio": np.zeros(RATE, np.float32)}, "no sampling rate"),
        ({"language": "en", "audio": np.zeros((16, 30), np.float32)}, r"takes \[16, 500\]"),
    ],
)
def test_bad_requests_name_the_problem(models, kwargs, message):
    from polymodal.llm_core.errors import PolymodalError

    proc = WhisperProcessor.from_pretrained(models[0])
    audio = kwargs.pop("audio", (clip("tone"), RATE))
    with pytest.raises(PolymodalError, match=message):
        proc.process(audios=[audio], **kwargs)


def test_a_pair_with_a_bad_rate_is_one_clip_named(llm):
    """vLLM's `(waveform, sampling_rate)` pair with a rate that is not a number is still one
    clip (not a list of two), and its loader names the rate."""
    from polymodal.llm_core.errors import MediaError

    for rate in ("16k", None):
        prompt = {"prompt": "", "multi_modal_data": {"audio": (clip("tone"), rate)},
                  "mm_processor_kwargs": {"language": "en"}}  # fmt: skip
        with pytest.raises(MediaError, match=rf"audio 1 .*whole number of Hz, got {rate!r}"):
            llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)


def test_previous_text_prompt_matches_generate_prompt_ids(models, llm):
    """Text with the audio is previous context: `<|startofprev|>` + its tokens before the
    task prompt, as `generate(prompt_ids=...)` puts it."""
    _, hf, extractor = models
    tokenizer = llm.tokenizer
    text = "the quick brown fox"
    prev = [tokenizer.convert_tokens_to_ids("<|startofprev|>")]
    prev += tokenizer.encode(" " + text, add_special_tokens=False)
    features = extractor(clip("tone"), sampling_rate=RATE, return_tensors="pt").input_features
    out = hf.generate(features, language="de", task="transcribe", prompt_ids=torch.tensor(prev),
                      max_new_tokens=STEPS, do_sample=False,
                      force_unique_generate_call=True)  # fmt: skip
    prompt = {"prompt": text, "multi_modal_data": {"audio": (clip("tone"), RATE)},
              "mm_processor_kwargs": {"language": "de"}}  # fmt: skip
    got = llm.generate(prompt, _params(llm), use_tqdm=False)[0]
    assert got.prompt_token_ids[: len(prev)] == prev
    assert got.outputs[0].token_ids == out[0].tolist()[-STEPS:]


def test_chat_form(models, llm, tmp_path):
    """Chat messages with an audio part (a WAV file decoded by processors/audio.py) give the
    same tokens as the prompt form (Pipeline(audio=...) runs `polymodal.speech`:
    tests/sdk/test_speech.py)."""
    import soundfile

    path = tmp_path / "chirp.wav"
    soundfile.write(path, clip("chirp"), RATE, subtype="FLOAT")
    ref = _reference(models, "chirp_fr_default_task")[1]
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}]}]
    chat = {"messages": messages, "mm_processor_kwargs": {"language": "fr"}}
    assert llm.generate(chat, _params(llm), use_tqdm=False)[0].outputs[0].token_ids == ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_triton_graphs_match_transformers(models):
    """On CUDA: the encoder through the Triton varlen kernel, cross attention through the Triton
    prefill and decode kernels, decode steps replaying graphs (cross tables as graph inputs);
    fp32 against transformers, twice (replayed buffers), and bf16 near fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    llm = LLM(str(models[0]), dtype="float32", device="cuda", attention_backend="triton")
    assert llm.engine.runner.graphs is not None
    names = list(CASES)
    refs = [_reference(models, n) for n in names]
    _check(llm, [_prompt(n) for n in names], refs)
    _check(llm, [_prompt(n) for n in names], refs)
    assert llm.engine.runner.graphs.runs > 0
    fast = LLM(str(models[0]), dtype="bfloat16", device="cuda")
    seen = record_logits_by_request(fast.engine)
    rid = fast.submit(_prompt(names[0]), _params(fast))
    fast.run([rid])
    torch.testing.assert_close(seen[rid][0].float().cpu(), refs[0][2][0], atol=0.15, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch1_gemv_folds_match_the_unfused_step(models):
    """bf16 batch-1 decode (graphs): the GEMV with the residual adds folded in (and q scaled in
    the attention kernel) gives the logits of cuBLAS with separate adds, step by step while the
    two runs' tokens agree (they differ only in accumulation order)."""
    runs = []
    for gemv in (True, False):
        llm = LLM(str(models[0]), dtype="bfloat16", device="cuda", decode_gemv=gemv)
        seen = record_logits_by_request(llm.engine)
        rid = llm.submit(_prompt("noise_en_transcribe"), _params(llm))
        out = {o.request_id: o for o in llm.run([rid])}[rid]
        assert llm.engine.runner.graphs.runs >= STEPS - 1
        runs.append((out.outputs[0].token_ids, [row.float().cpu() for row in seen[rid]]))
    (tokens, logits), (ref_tokens, ref_logits) = runs
    for step in range(STEPS):
        torch.testing.assert_close(logits[step], ref_logits[step], atol=0.05, rtol=0)
        if tokens[step] != ref_tokens[step]:
            break


def test_speculative_drafts_keep_the_transcripts(models):
    """n-gram drafts on an encoder-decoder model (cross-attention rows, suppressed tokens,
    timestamp rules): transformers' tokens still."""
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=128,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_min": 1, "prompt_lookup_max": 2})  # fmt: skip
    names = list(CASES)
    ids = [llm.submit(_prompt(n), _params(llm)) for n in names]
    final = {o.request_id: o for o in llm.run(ids)}
    for rid, name in zip(ids, names):  # (logits: a step holds several rows of a request)
        prompt, tokens, _ = _reference(models, name)
        assert final[rid].prompt_token_ids == prompt
        assert final[rid].outputs[0].token_ids == tokens[:STEPS]
    assert llm.engine.speculation.num_draft_tokens > 0
