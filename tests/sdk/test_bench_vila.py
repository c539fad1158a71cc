"""`polymodal bench nvila-8b` (`polymodal.bench.vila`) on the CPU: NVILA's config picks this
bench with its own count defaults, the bench runs end to end through the CLI on a tiny NVILA
checkpoint (both sides, every image checked to decode the tokens asked for, the same prompt
lengths), and like with like: the reference batched as the bench batches it (tiles of the whole
batch through the tower, left-padded prompts) gives the tokens ours gives on its tensors."""

import json

import pytest
import torch

from polymodal.bench import BUILTIN, FAMILY_BENCHES, family_bench
from polymodal.cli import main
from tests.helpers import tiny_checkpoint
from tests.sdk.test_bench_speech import check_side

TOKENS = 3


def test_nvila_runs_its_own_bench(tmp_path):
    from polymodal.bench import vila
    from polymodal.bench.checkpoint import has_tokenizer

    assert family_bench(BUILTIN["nvila-8b"]) == FAMILY_BENCHES["llava_llama"] == vila.__name__
    path = vila.bench_checkpoint(BUILTIN["nvila-8b"])
    assert path != BUILTIN["nvila-8b"] and has_tokenizer(path / "llm")
    assert vila.bench_checkpoint(path) == path  # a checkpoint with its tokenizer: as it is
    frames = vila.video(3, seed=1)
    assert len({f.tobytes() for f in frames}) == 3 and frames[0].size == (448, 448)


def test_bench_end_to_end(tmp_path_factory, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path_factory, "nvila")
    out = tmp_path / "bench.json"
    argv = ["bench", str(path), "--dummy-weights", "--device", "cpu", "--images", "2",
            "--hf-images", "1", "--hf-batch", "1", "--output-tokens", str(TOKENS),
            "--video-frames", "4", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["random_weights"] and r["frames"] == 4 and r["output_tokens"] == TOKENS
    check_side(r["ours"]["captioning"], 2)
    check_side(r["hf"]["captioning"], 1)
    # 4 frames of 4 x 4 tokens, averaged in pairs (the tiny TSP pooling [2, 1, 1])
    assert r["video_tokens"] == 2 * 4
    ours, ref = r["ours"]["video"], r["hf"]["video"]
    assert ours["prompt_tokens"] == ref["prompt_tokens"] > r["video_tokens"]
    assert len(ours["calls_ms"]) == len(ref["calls_ms"]) == 3 and ours["ttft_ms"] > 0
    assert r["speedup"]["video_ttft"] == pytest.approx(ref["ttft_ms"] / ours["ttft_ms"])
    table = capsys.readouterr().out
    assert "images/s" in table and "TTFT ms" in table and "4 frames of 448x448" in table


def test_batched_reference_decodes_ours_tokens(tmp_path_factory):
    """Random weights made by the reference, loaded into ours: images of different shapes
    (different tile counts: the batch is left-padded) and a video give ours' greedy tokens;
    the batched tiles give each prompt the embeddings the reference gives it alone."""
    from polymodal import LLM, SamplingParams
    from polymodal.bench.vila import (
        QUESTION,
        RandomVila,
        ReferenceSide,
        messages,
        reference_tensors,
        video,
    )  # fmt: skip
    from tests.sdk.vl_reference import random_image

    path = tiny_checkpoint(tmp_path_factory, "nvila")
    ref = ReferenceSide(RandomVila(path))
    llm = LLM(str(path), dtype="float32", device="cpu", dummy_weights=True)
    llm.engine.runner.model.load_weights(reference_tensors(ref.ref), "the reference")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    pics = [random_image(90, 40, 0), random_image(20, 150, 1), random_image(28, 28, 2)]
    with torch.inference_mode():
        prompts = ref.image_prompts(pics)
        alone = [ref.ref.inputs_embeds([im, QUESTION]) for im in pics]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    for batched, single in zip(prompts, alone):
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    out = llm.generate([{"messages": messages(im)} for im in pics], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in out] == ref.generate_ids(prompts, 4).tolist()
    frames = video(4, seed=3)
    prompt = {"messages": messages(frames, "video"), "num_frames": 4}
    got = llm.generate(prompt, params, use_tqdm=False)[0]
    embeds = ref.video_prompt(frames)
    assert len(got.prompt_token_ids) == len(embeds)
    assert list(got.outputs[0].token_ids) == ref.generate_ids([embeds], 4)[0].tolist()
