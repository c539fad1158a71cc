"""Mllama end to end (processor + tiled vision encoder + cross-attention decoder) vs transformers,
fp32 on the CPU: text only, one image, several images, adjacent images, images between text;
mixed batches of text and image requests in one step; chunk budgets that cut a prompt before,
at and after its images (the image rows are written in the first chunk whatever it holds);
prefix-cache hits (token blocks shared, image rows written anew); preemption. Also the vision
encoder alone against transformers' image states."""

import pytest
import torch
import transformers as tf

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    hf_inputs,
    messages,
    random_image,
)

STEPS = 6
IMAGES = [random_image(64, 48, 0), random_image(28, 28, 1), random_image(90, 40, 2),
          random_image(9, 50, 3)]  # fmt: skip
CHAT = {  # name -> images of one user message
    "text_only": [],
    "one_image": IMAGES[:1],
    "three_images": IMAGES[1:],  # adjacent: the text after them sees all three
}
RAW = {  # name -> (prompt, images)
    "images_between_text": ("Look <|image|> at this, then <|image|> this one.", IMAGES[2:]),
    "image_first": ("<|image|>If I had to write a haiku", IMAGES[:1]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "mllama")
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, tf.AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def llm(models):
    return LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def _reference(models, case):
    _, hf, processor = models
    if case in CHAT:
        images = CHAT[case]
        return hf_greedy(hf, hf_inputs(processor, messages(images), images), STEPS)
    prompt, images = RAW[case]
    inputs = dict(processor(text=[prompt], images=[images], return_tensors="pt"))
    return hf_greedy(hf, inputs, STEPS)


def _prompt(case):
    if case in CHAT:
        return {"messages": messages(CHAT[case])}
    prompt, images = RAW[case]
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


@pytest.mark.parametrize("case", [*CHAT, *RAW])
def test_single_request_matches_transformers(models, llm, case):
    tokens, logits = _reference(models, case)
    assert_single_matches(llm, _prompt(case), tokens, logits, STEPS, case)


def test_images_change_the_output(models):
    """Not a vacuous check: another image moves the logits far beyond the 1e-4 tolerance."""
    _, a = _reference(models, "one_image")
    _, hf, processor = models
    other = [random_image(64, 48, 9)]
    _, b = hf_greedy(hf, hf_inputs(processor, messages(other), other), 1)
    assert (a[0] - b[0]).abs().max() > 0.05


def test_mixed_batch_matches_transformers(models, llm):
    """Text-only and image requests of every kind in the same steps."""
    cases = [*CHAT, *RAW, "one_image", "text_only"]
    refs = [_reference(models, case) for case in cases]
    assert_batch_matches(llm, [_prompt(case) for case in cases], refs, STEPS)
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


@pytest.mark.parametrize("budget", [3, 7, 16])
def test_chunked_prefill_matches_transformers(models, budget):
    """Budgets whose first chunk ends before the first image, at it or past it."""
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
              max_num_batched_tokens=budget)  # fmt: skip
    for case in ("three_images", "images_between_text"):
        tokens, logits = _reference(models, case)
        assert_single_matches(llm, _prompt(case), tokens, logits, STEPS, f"{case}@{budget}")
    cases = ["one_image", "text_only", "images_between_text"]
    assert_batch_matches(llm, [_prompt(c) for c in cases], [_reference(models, c) for c in cases],
                         STEPS)  # fmt: skip


def test_prefix_hits_rewrite_the_image_rows(models):
    """The same prompt again reuses its token blocks (a prefix hit) and writes its image rows
    anew; the same text with another image shares nothing."""
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)
    tokens, logits = _reference(models, "three_images")
    kv = llm.engine.scheduler.kv
    assert_single_matches(llm, _prompt("three_images"), tokens, logits, STEPS, "first")
    before = kv.num_hit_tokens
    assert_single_matches(llm, _prompt("three_images"), tokens, logits, STEPS, "again")
    assert kv.num_hit_tokens > before
    _, hf, processor = models
    other = [random_image(28, 28, 11), *IMAGES[2:]]
    ref = hf_greedy(hf, hf_inputs(processor, messages(other), other), STEPS)
    hits = kv.num_hit_tokens
    assert_single_matches(llm, {"messages": messages(other)}, *ref, STEPS, "other image")
    assert kv.num_hit_tokens == hits


def test_preemption_keeps_outputs(models, llm):
    """A pool too small for every request at once: requests are preempted (their image rows
    freed) and recomputed, with the same tokens as in a large pool (and the reference's
    first ones); no block leaks."""
    tight = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=45)
    cases = ["one_image", "image_first", "text_only", "one_image"]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    assert tight.engine.max_model_len >= 48  # the pool holds one request of 4 images alone
    outs = tight.generate([_prompt(c) for c in cases], params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    roomy = llm.generate([_prompt(c) for c in cases], params, use_tqdm=False)
    for case, out, ref in zip(cases, outs, roomy):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].token_ids[:STEPS] == _reference(models, case)[0]
    assert tight.engine.num_free_blocks == tight.engine.scheduler.kv.num_usable_blocks


def test_vision_encoder_matches_transformers(models, llm):
    """The encoder's rows of an image equal transformers' projected image states."""
    _, hf, processor = models
    images = IMAGES[1:]
    inputs = hf_inputs(processor, messages(images), images)
    with torch.no_grad():
        vision = hf.model.vision_model(
            pixel_values=inputs["pixel_values"],
            aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        ).last_hidden_state
        ref = hf.model.multi_modal_projector(vision)[0]  # [images, tiles, patches + 1, hidden]
    prompt = llm.process({"messages": messages(images)})
    with torch.inference_mode():  # as the engine runs it (`add_parts` in place)
        ours = llm.engine.runner.model.encode(prompt.mm_items)
    for i, rows in enumerate(ours):
        assert (rows - ref[i].flatten(0, 1)).abs().max().item() <= 1e-5


def test_graph_step_paths_match_transformers(models):
    """What the decode and prefill CUDA graphs run (cross tables, row counts and ranges packed
    into their static inputs, batches padded to buckets), eagerly on the CPU: a mixed batch in
    small chunks still gives the reference's tokens and logits."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.prefill_graphs import PrefillGraphs

    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
              max_num_batched_tokens=16)  # fmt: skip
    runner = llm.engine.runner
    shape = (runner.model, runner.kv_caches)
    groups = (runner.uses_mrope, runner.num_kv_groups, runner.num_cross_groups,
              runner.max_cross_blocks)  # fmt: skip
    assert runner.num_cross_groups == 2  # two cross layers of five: groups of one layer
    runner.graphs = DecodeGraphs(*shape, 8, 16, *groups)
    runner.prefill_graphs = PrefillGraphs(*shape, 64, 16, *groups)
    stored = []  # first steps: the rows' K/V stored ahead, then the step through the graph
    store = runner.model.store_cross_states
    runner.model.store_cross_states = lambda *args: stored.append(1) or store(*args)
    cases = ["one_image", "text_only", "images_between_text", "three_images"]
    refs = [_reference(models, case) for case in cases]
    assert_batch_matches(llm, [_prompt(case) for case in cases], refs, STEPS)
    assert runner.graphs.runs > 0 and runner.prefill_graphs.runs > 0 and stored


def test_too_many_images_name_the_limit(llm):
    """The cross-attention cache holds 4 images a request: a fifth is refused, naming it."""
    from polymodal import InvalidInputError

    images = [random_image(28, 28, i) for i in range(5)]
    with pytest.raises(InvalidInputError, match="bring 340 encoder rows.*holds 272 per request"):
        llm.generate({"messages": messages(images)}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished()
