"""Multimodal invariants: chunking inside an image, encoder-cache hits, media-aware prefix cache."""

import numpy as np
import pytest
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.pipeline import Pipeline
from tests.helpers import tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _image(seed, w=224, h=168):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(image, text="What is this?"):
    parts = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


def _llm(ckpt, **kw):
    return LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128, **kw)


def test_chunk_budget_smaller_than_one_image(ckpt):
    ref = _llm(ckpt).generate(_prompt(_image(0)), GREEDY)[0].outputs[0].token_ids
    llm = _llm(ckpt, max_num_batched_tokens=7)
    slots = llm.process(_prompt(_image(0))).mm_items[0].num_slots
    assert slots > 7 * 2  # the image's slots span at least three steps
    assert llm.generate(_prompt(_image(0)), GREEDY)[0].outputs[0].token_ids == ref


def test_encoder_cache_hit_gives_same_output(ckpt):
    llm = _llm(ckpt, enable_prefix_caching=False)
    first = llm.generate(_prompt(_image(1)), GREEDY)[0].outputs[0].token_ids
    cache = llm.engine.runner.encoder_cache
    hits = cache.hits
    second = llm.generate(_prompt(_image(1), "Describe it."), GREEDY)[0].outputs[0].token_ids
    assert cache.hits > hits
    fresh = _llm(ckpt).generate(_prompt(_image(1), "Describe it."), GREEDY)[0].outputs[0]
    assert second == fresh.token_ids and len(first) == 8


def test_prefix_cache_separates_different_images_of_same_size(ckpt):
    llm = _llm(ckpt)
    kv = llm.engine.scheduler.kv
    llm.generate(_prompt(_image(2)), GREEDY)
    before = kv.num_hit_tokens
    other = llm.generate(_prompt(_image(3)), GREEDY)[0].outputs[0].token_ids
    # only the system-prompt blocks before the image may be shared
    image_start = llm.process(_prompt(_image(3))).mm_items[0].slot_start
    assert kv.num_hit_tokens - before <= image_start
    assert other == _llm(ckpt).generate(_prompt(_image(3)), GREEDY)[0].outputs[0].token_ids
    before = kv.num_hit_tokens
    llm.generate(_prompt(_image(2)), GREEDY)
    assert kv.num_hit_tokens - before > image_start + 16  # blocks inside the image reused


def test_bad_media_fails_alone_and_good_request_completes(ckpt, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)  # a JPEG header and nothing else
    pipe = Pipeline(ckpt, dtype="float32", device="cpu", num_kv_blocks=128)
    good = {"image": _image(4), "text": "Describe."}
    alone = pipe(**good, max_tokens=8, temperature=0.0, ignore_eos=True)
    results = pipe(
        [{"image": str(bad), "text": "Describe."}, good],
        max_tokens=8,
        temperature=0.0,
        ignore_eos=True,
    )
    assert results[0].error and "broken.jpg" in results[0].error
    assert results[1].error is None and results[1].token_ids == alone.token_ids


def test_async_scheduling_same_tokens(ckpt):
    prompts = [_prompt(_image(s)) for s in (10, 11, 12)] + [_prompt(_image(10), "Again?")]
    sync = [o.outputs[0].token_ids for o in _llm(ckpt).generate(prompts, GREEDY)]
    outs = _llm(ckpt, async_scheduling=True, max_num_batched_tokens=40).generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == sync


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_prefill_steps_equal_unpadded(ckpt, async_scheduling):
    """What a prefill CUDA graph runs, eagerly on the CPU: the step padded to its token bucket
    (padding tokens store nothing) and to 8 sequences (padding ones have no queries). Chunked
    image prompts, text prompts and decodes mixed in: same logits, same tokens as unpadded."""
    from polymodal.llm_core.prefill_graphs import PrefillGraphs
    from tests.helpers import record_logits

    def text(n):
        return {"messages": [{"role": "user", "content": "hi " * n}]}

    # first many short prompts per step, then long ones: stale sequences in the buffers
    rounds = [[text(n) for n in (1, 2, 1, 3, 2)]]
    rounds.append([_prompt(_image(i), "Describe it." * (i + 1)) for i in range(3)])
    rounds[1] += [text(3), text(20)]
    runs = []
    for padded in (False, True):
        llm = _llm(ckpt, max_num_batched_tokens=40, async_scheduling=async_scheduling)
        runner = llm.engine.runner
        if padded:
            max_blocks = runner.kv_caches[0].shape[1]
            runner.prefill_graphs = PrefillGraphs(
                runner.model, runner.kv_caches, 40, max_blocks, runner.uses_mrope
            )  # not captured: run() pads and runs the forward eagerly
        seen = record_logits(llm.engine)
        # each round queued whole before it runs: the same steps in both runs (generate would
        # add prompts as its worker threads finish them, and steps would differ by timing)
        outs = [llm.run([llm.submit(p, GREEDY) for p in r]) for r in rounds]
        tokens = [o.outputs[0].token_ids for r in outs for o in r]
        runs.append((tokens, seen))
    assert runner.prefill_graphs.runs > 5
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][1]) == len(runs[1][1])
    for ref, got in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-4)
