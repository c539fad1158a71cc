"""Images given as their projected tower output (vLLM's image embeddings) for the families
whose placeholders expand in the text (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3;
processors/image_embeds.py): the rows transformers' `get_image_features` makes, given in the
images' place as chat parts or as `multi_modal_data` (one tensor per image, or vLLM's batched
`[k, rows, hidden]` tensor), yield the images' greedy tokens and logits; mixed with a real
image; refused naming why (another hidden size, a family that takes none)."""

import pytest
import torch
import transformers as tf

from polymodal import LLM, InvalidInputError
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_single_matches,
    hf_and_ours,
    hf_greedy,
    hf_sample_inputs,
    media_messages,
    random_image,
)

STEPS = 4
IMAGES = [random_image(64, 48, 0), random_image(90, 40, 2)]


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "gemma3_vl"])
def models(request, tmp_path_factory):
    return hf_and_ours(tmp_path_factory, request.param)


def _rows(hf, processor, images) -> list[torch.Tensor]:
    """transformers' projected tower rows of each image (as its prompt would hold them)."""
    inputs = hf_sample_inputs(processor, images, [])
    extra = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    with torch.no_grad():
        out = hf.model.get_image_features(inputs["pixel_values"], **extra)
    rows = out.pooler_output if hasattr(out, "pooler_output") else out
    return [r.reshape(-1, r.shape[-1]) for r in rows]


def _with_parts(parts) -> list[dict]:
    return [{"role": "user", "content": parts + [{"type": "text", "text": "Describe."}]}]


def test_rows_in_place_of_images_match_the_images(models):
    hf, processor, llm = models
    tokens, logits = hf_greedy(hf, hf_sample_inputs(processor, IMAGES, []), STEPS)
    rows = _rows(hf, processor, IMAGES)
    parts = [{"type": "image_embeds", "image_embeds": r} for r in rows]
    assert_single_matches(llm, {"messages": _with_parts(parts)}, tokens, logits, STEPS, "parts")
    mixed = [parts[0], {"type": "image", "image": IMAGES[1]}]  # rows, then a real image
    assert_single_matches(llm, {"messages": _with_parts(mixed)}, tokens, logits, STEPS, "mixed")
    text = processor.apply_chat_template(media_messages(IMAGES, []), tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    prompt = {"prompt": text, "multi_modal_data": {"image": rows}}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, "multi_modal_data")


def test_batched_rows_are_several_images(models):
    """vLLM's `[k, rows, hidden]` tensor: k images (two of one size: as many rows each)."""
    hf, processor, llm = models
    same = [random_image(64, 48, 5), random_image(64, 48, 6)]
    tokens, logits = hf_greedy(hf, hf_sample_inputs(processor, same, []), STEPS)
    rows = _rows(hf, processor, same)
    text = processor.apply_chat_template(media_messages(same, []), tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    prompt = {"prompt": text, "multi_modal_data": {"image": torch.stack(rows)}}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, "batched")


def test_bad_rows_are_refused(models, tmp_path_factory):
    _, _, llm = models
    hidden = llm.model_config.hidden_size
    wrong = _with_parts([{"type": "image_embeds", "image_embeds": torch.randn(4, hidden + 1)}])
    with pytest.raises(InvalidInputError, match="hidden size"):
        llm.generate({"messages": wrong}, use_tqdm=False)
    nan = torch.full((4, hidden), float("nan"))
    with pytest.raises(InvalidInputError, match="image 1 embeddings.*NaN"):
        llm.generate({"messages": _with_parts([{"type": "image_embeds", "image_embeds": nan}])},
                     use_tqdm=False)  # fmt: skip


def test_gemma3_takes_one_views_rows(tmp_path_factory):
    """Gemma 3's rows are one view's (`image_seq_length`); more (pan-and-scan crops) is an
    error saying to give the image."""
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "gemma3_vl")), dtype="float32",
              device="cpu", num_kv_blocks=64)  # fmt: skip
    per_view = llm.processor.image_seq_length
    rows = torch.randn(2 * per_view, llm.model_config.hidden_size)
    parts = [{"type": "image_embeds", "image_embeds": rows}]
    with pytest.raises(InvalidInputError, match=f"one view's {per_view} rows, got {2 * per_view}"):
        llm.generate({"messages": _with_parts(parts)}, use_tqdm=False)


def test_a_family_without_embeddings_names_those_with(tmp_path_factory):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "pixtral")), dtype="float32", device="cpu",
              num_kv_blocks=64)  # fmt: skip
    rows = torch.randn(4, llm.model_config.hidden_size)
    parts = [{"type": "image_embeds", "image_embeds": rows}]
    with pytest.raises(InvalidInputError, match="LLaVA-NeXT, Gemma 3"):
        llm.generate({"messages": _with_parts(parts)}, use_tqdm=False)


def test_served_rows(tmp_path_factory):
    """A served `image_embeds` part of rows alone (base64 `torch.save`, `--enable-mm-embeds`):
    the image's reply."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from tests.sdk.server_process import post, tiny_server

    path = tiny_checkpoint(tmp_path_factory, "llava")
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    rows = _rows(hf, tf.AutoProcessor.from_pretrained(path), IMAGES[:1])[0]
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "m", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    args = ("--enable-mm-embeds", "--dtype", "float32", "--num-kv-blocks", "64")
    with tiny_server(tmp_path_factory, *args, arch="llava") as url:
        png = io.BytesIO()
        IMAGES[0].save(png, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        url_part = {"type": "image_url", "image_url": {"url": data_url}}
        image = post(url, "/v1/chat/completions", {**body, "messages": _with_parts([url_part])})
        part = {"type": "image_embeds", "image_embeds": encoded}
        given = post(url, "/v1/chat/completions", {**body, "messages": _with_parts([part])})
        want = image.json()["choices"][0]["message"]["content"]
        assert given.json()["choices"][0]["message"]["content"] == want
