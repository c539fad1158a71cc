"""`polymodal bench` for Whisper and Phi-4-multimodal on the CPU: the checkpoint a shipped
config gets (special tokens at the ids its configs name: our processor and transformers' build
the same prompt), each bench end to end through the CLI on a tiny checkpoint (both sides, every
request checked to decode the tokens asked for), and like with like: the tensors ours loads are
transformers', so greedy tokens agree (Phi-4-MM: the adapter merged vs applied per request)."""

import json

import numpy as np
import pytest
import torch

from polymodal.bench import BUILTIN, FAMILY_BENCHES, family_bench
from polymodal.cli import main
from tests.helpers import tiny_checkpoint

TOKENS = 3


def run_cli(path, tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", str(path), "--dummy-weights", "--device", "cpu", "--clips", "2",
            "--hf-clips", "1", "--hf-batch", "1", "--output-tokens", str(TOKENS),
            "--json", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def check_side(side: dict, requests: int) -> None:
    assert side["requests"] == requests
    assert side["seconds"] > 0 and side["latency_ms"] > 0
    assert side["requests_s"] == pytest.approx(requests / side["seconds"])
    assert side["output_tokens_s"] == pytest.approx(requests * TOKENS / side["seconds"])


def test_the_speech_families_run_their_own_bench():
    assert family_bench(BUILTIN["whisper-large-v3"]) == FAMILY_BENCHES["whisper"]
    assert family_bench(BUILTIN["phi-4-multimodal"]) == FAMILY_BENCHES["phi4mm"]
    assert family_bench(BUILTIN["qwen2.5-vl-7b"]) is None  # the engine workload


def test_whisper_config_gets_its_special_tokens(tmp_path):
    from polymodal.bench.checkpoint import write_whisper_checkpoint
    from polymodal.processors.whisper import WhisperProcessor

    path = write_whisper_checkpoint(BUILTIN["whisper-large-v3"], tmp_path / "ckpt")
    proc = WhisperProcessor.from_pretrained(path)
    # large-v3's prompt ids: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    assert proc.prompt_ids("en") == [50258, 50259, 50360, 50364]
    assert proc.prompt_ids("de", "translate") == [50258, 50261, 50359, 50364]
    assert (proc.prev, proc.no_speech, proc.timestamp_begin) == (50362, 50363, 50365)
    tok = proc.tokenizer
    assert len(tok) == 51866 and tok.convert_ids_to_tokens(51865) == "<|30.00|>"
    assert tok.decode([50259, 50365], skip_special_tokens=True) == ""  # specials are special


def test_phi4mm_config_gets_a_transformers_checkpoint(tmp_path):
    """The hub-layout config converted: transformers' processor and ours give the same ids for
    an audio + image request, the slots at the config's token ids."""
    import transformers as tf

    from polymodal.bench.checkpoint import write_phi4mm_checkpoint
    from polymodal.bench.phi4mm import messages
    from polymodal.bench.workloads import clips, images
    from polymodal.processors.phi4mm import Phi4MMProcessor

    path = write_phi4mm_checkpoint(BUILTIN["phi-4-multimodal"], tmp_path / "ckpt")
    config = tf.AutoConfig.from_pretrained(path)
    assert config.model_type == "phi4_multimodal" and config.num_hidden_layers == 32
    ours = Phi4MMProcessor.from_pretrained(path)
    hf = tf.AutoProcessor.from_pretrained(path)
    image, clip = images(1)[0], clips(1, 2.0)[0]
    msgs = messages("mixed", image, clip)
    got = ours.process(messages=msgs).token_ids
    parts = [{"type": p["type"]} if p["type"] != "text" else p for p in msgs[0]["content"]]
    text = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    ref = hf(text=[text], images=[image], audio=[clip], return_tensors="pt")["input_ids"][0]
    assert got == ref.tolist()
    image_id, audio_id = config.vision_config.image_token_id, config.audio_config.audio_token_id
    assert got.count(image_id) > 500 and got.count(audio_id) == 25  # 448 px: 545; 2 s: 25


def test_whisper_bench_end_to_end(tmp_path_factory, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    r = run_cli(path, tmp_path)
    assert r["random_weights"] and r["clip_seconds"] == 5  # the tiny checkpoint's window
    check_side(r["ours"], 2)
    check_side(r["hf"], 1)
    assert set(r["speedup"]) == {"requests_s", "latency"}
    assert r["speedup"]["requests_s"] == pytest.approx(
        r["ours"]["requests_s"] / r["hf"]["requests_s"]
    )
    table = capsys.readouterr().out
    assert "clips/s" in table and f"exactly {TOKENS} output tokens" in table


def test_phi4mm_bench_end_to_end(tmp_path_factory, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path_factory, "phi4mm")
    r = run_cli(path, tmp_path, "--phi-workloads", "audio,mixed")
    assert r["adapters"] == ["speech-lora", "vision-lora"]
    assert set(r["ours"]) == set(r["hf"]) == set(r["speedup"]) == {"audio", "mixed"}
    for kind in ("audio", "mixed"):
        check_side(r["ours"][kind], 2)
        check_side(r["hf"][kind], 1)
    table = capsys.readouterr().out
    assert "audio (speech adapter)" in table and "mixed (vision adapter)" in table


def test_whisper_sides_decode_the_same_tokens(tmp_path_factory):
    """Ours through Pipeline on transformers' tensors (the timestamp rows zeroed) gives
    transformers' greedy tokens."""
    from polymodal import Pipeline
    from polymodal.bench.whisper import HFWhisper
    from polymodal.bench.workloads import clips

    path = tiny_checkpoint(tmp_path_factory, "whisper")
    hf = HFWhisper(path, "cpu", torch.float32, random_weights=True)
    begin = hf.model.generation_config.no_timestamps_token_id + 1
    assert not hf.model.get_output_embeddings().weight[begin:].any()  # tied to the rows
    pipe = Pipeline(str(path), dtype="float32", device="cpu", dummy_weights=True)
    pipe.llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")
    waves = clips(2, 5.0, seed=3)
    ref = hf.transcribe(waves, 6).tolist()
    out = pipe([{"audio": (w, 16000), "language": "en"} for w in waves],
               temperature=0.0, max_tokens=6, ignore_eos=True)  # fmt: skip
    assert [r.token_ids for r in out] == ref
    assert all(t < begin for row in ref for t in row)


def test_phi4mm_sides_decode_the_same_tokens(tmp_path_factory):
    """transformers with the speech adapter merged (`merge_lora`) == ours applying it per
    request; taking the adapter back restores the base weights."""
    from polymodal import LLM, SamplingParams
    from polymodal.bench.phi4mm import HFPhi4, workload_inputs

    path = tiny_checkpoint(tmp_path_factory, "phi4mm")
    hf = HFPhi4(path, "cpu", torch.float32, random_weights=True)
    llm = LLM(str(path), dtype="float32", device="cpu", dummy_weights=True, max_model_len=4096)
    llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")
    base = hf.model.model.layers[0].self_attn.qkv_proj.weight.clone()
    hf.use_adapter("speech")
    assert not torch.equal(base, hf.model.model.layers[0].self_attn.qkv_proj.weight)
    batch = workload_inputs("audio", 2, seed=9)
    ref = hf.generate_ids(batch, 4).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.generate([{"messages": m} for m in batch], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in out] == ref
    hf.use_adapter(None)
    torch.testing.assert_close(hf.model.model.layers[0].self_attn.qkv_proj.weight, base)


def test_a_short_side_is_caught():
    from polymodal.bench.sides import check_counts, run_side
    from polymodal.bench.whisper import tokens_before

    assert tokens_before(torch.tensor([5, 6, 7]), eos=9) == 3
    assert tokens_before(torch.tensor([5, 9, 9]), eos=9) == 1
    check_counts([4, 4], 4, "ours")
    with pytest.raises(RuntimeError, match="expected 4 each"):
        check_counts([4, 8], 4, "ours")  # a whisper clip decoded as two windows
    short = lambda batch, n: [n - 1] * len(batch)  # noqa: E731
    with pytest.raises(RuntimeError, match="transformers"):
        run_side(short, "cpu", [np.zeros(1)] * 2, 4, 2, [np.zeros(1)], "transformers")
