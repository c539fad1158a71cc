"""`polymodal bench` for the VL families (`polymodal.bench.vl`) on the CPU: the tokenizer it
writes for a shipped config puts the family's image tokens at the config's ids (both
processors then expand an image into the same ids), a VL config picks this bench, and on a
tiny checkpoint both sides run every workload on the same tensors (the same greedy tokens)."""

import json

import pytest
import torch

from polymodal.bench import BUILTIN, family_bench
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def bench():
    from polymodal.bench import vl

    return vl


@pytest.mark.parametrize(
    "name",
    [
        "llama4-scout-reduced",
        "gemma-3-12b-it",
        "llava-next-7b",
        "llava-onevision-7b",
        "pixtral-12b",
        "llama-3.2-11b-vision",
    ],
)
def test_shipped_config_gets_a_tokenizer_with_its_ids(bench, name):
    import transformers as tf

    from polymodal.llm_core.registry import processor_class

    path = bench.user_checkpoint(BUILTIN[name])
    config = json.loads((path / "config.json").read_text())
    hf = tf.AutoProcessor.from_pretrained(path)
    _, _, ids = bench.family_tokens(config)
    assert ids and all(hf.tokenizer.convert_tokens_to_ids(t) == i for t, i in ids.items())
    ours = processor_class(config["architectures"][0]).from_pretrained(path)
    image = bench.images(1)[0]
    messages = bench.chat(image)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    got = ours.process(messages=messages).token_ids
    assert got == ref and ids[next(iter(ids))] in got  # the image token is in the prompt


@pytest.mark.parametrize("arch", ["llama4_vl", "mllama"])  # slot tokens; cross-attention
def test_runs_both_sides_on_the_same_tensors(bench, tmp_path_factory, tmp_path, arch):
    from polymodal import LLM, SamplingParams

    path = tiny_checkpoint(tmp_path_factory, arch)
    from polymodal.cli import main

    out = tmp_path / "out.json"
    argv = ["bench", str(path), "--device", "cpu", "--images", "3", "--output-tokens", "3",
            "--hf-images", "2", "--hf-batch", "1", "--json", str(out)]  # fmt: skip
    assert family_bench(path) == "polymodal.bench.vl"
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["speedup"]) == {"captioning", "ttft", "decode"}
    assert results["ours"]["caption_images"] == 3 and results["hf"]["caption_images"] == 2
    # like with like: the weights the bench loads into ours are transformers', and the prompts
    # expand the same way, so greedy tokens agree
    hf = bench.HFRunner(path, "cpu", torch.float32)
    llm = LLM(str(path), dtype="float32", device="cpu", dummy_weights=True)
    llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")
    image = bench.images(1, seed=5)[0]
    ref = hf.generate([image], 4)[0].tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.generate({"messages": bench.chat(image)}, params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref
    floor = bench.ttft_floor(llm, bandwidth=1e12, peak=1e14)
    assert floor["prompt_tokens"] > 20 and floor["ttft_floor_ms"] > 0
    tower, decoder = floor["ttft_phases"]["tower"], floor["ttft_phases"]["decoder"]
    assert tower["tflop"] > 0 and decoder["tflop"] > 0 and decoder["weights_ms"] > 0
    # each phase's larger term (1e14 FLOP/s: 10 ms a TFLOP), summed: never below the totals'
    phases = max(tower["weights_ms"], tower["tflop"] * 1e1)
    phases += max(decoder["weights_ms"], decoder["tflop"] * 1e1)
    assert floor["ttft_floor_ms"] == pytest.approx(phases, rel=1e-12)
    totals = max(floor["ttft_weights_ms"], floor["ttft_tflop"] * 1e1)
    assert floor["ttft_floor_ms"] >= totals * (1 - 1e-12)


def test_table_gives_the_ttft_against_the_measured_rate_and_the_datasheet(bench, capsys):
    """The floor's FLOP terms at the rate measured in the run, and the datasheet ratio beside
    it, each phase's larger term summed (a weight-bound decoder after a compute-bound tower)."""
    phases = {"tower": {"tflop": 4.0, "weights_ms": 0.5},
              "decoder": {"tflop": 4.0, "weights_ms": 2.5}}  # fmt: skip
    floor = bench.phase_floor_ms(phases, 800.0)  # 5 + 5 ms
    r = {"model": "m", "device": "cuda", "output_tokens": 8, "prompt_tokens": 756,
         "ours": {"ttft_ms": 40.0, "decode_ms_per_token": 2.0, "images_s": 9.0},
         "ttft_floor_ms": floor, "ttft_tflop": 8.0, "ttft_weights_ms": 3.0,
         "ttft_phases": phases, "matmul_tflops": 800.0, "decode_floor_ms": 1.5}  # fmt: skip
    bench.print_table(r)
    line = next(x for x in capsys.readouterr().out.splitlines() if "floors:" in x)
    assert "at 800 TFLOP/s" in line and ": 4.00x" in line  # 40 / 10
    assert "decoder 4.00 TFLOP / 2.50 ms of weights" in line
    assert f"({40 / (8 / 989 * 1e3):.2f}x at the datasheet's 989)" in line
    phases["decoder"]["weights_ms"] = 6.0  # the decoder weight-bound at the datasheet rate
    bench.print_table(r)
    line = next(x for x in capsys.readouterr().out.splitlines() if "floors:" in x)
    datasheet = 4 / 989 * 1e3 + 6.0  # the tower's FLOPs, then the decoder's weights
    assert f"({40 / datasheet:.2f}x at the datasheet's 989)" in line
    assert "decode 1.50 ms: 75%" in line


def test_flop_counter_counts_the_fused_gelu_gemm(bench):
    """`_addmm_activation` (the towers' fc1 + bias + GELU in one GEMM on CUDA) counts as the
    addmm it is: 2 x rows x out x in; torch's own table leaves it out."""
    x, w, b = torch.randn(6, 5), torch.randn(7, 5), torch.randn(7)
    with bench.flop_counter() as counter:
        torch._addmm_activation(b, x, w.t(), use_gelu=True)
        torch.nn.functional.linear(x, w, b)
    assert counter.get_total_flops() == 2 * (2 * 6 * 7 * 5)


@pytest.mark.parametrize("name", ["pixtral-12b", "llama-3.2-11b-vision", "qwen2.5-vl-7b"])
def test_bench_checkpoints_load_without_a_regex_warning(bench, name, capfd):
    """The checkpoints the benches write name the transformers that wrote them (as
    `save_pretrained` does), so transformers does not take them for old Mistral checkpoints
    and warn about their tokenizer's regex at every load (every process of a serve bench)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from polymodal.bench import resolve_bench_model
    from polymodal.bench.checkpoint import write_user_checkpoint

    config_dir = Path(resolve_bench_model(name))
    if name.startswith("qwen"):
        out = write_user_checkpoint(config_dir, Path(tempfile.mkdtemp()) / "checkpoint")
    else:
        out = bench.user_checkpoint(config_dir)
    assert "transformers_version" in json.loads((out / "config.json").read_text())
    capfd.readouterr()
    AutoTokenizer.from_pretrained(out)
    assert "incorrect regex" not in capfd.readouterr().err
