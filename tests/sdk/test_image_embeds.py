"""Images and videos given as their vision tower's output (vLLM's `{"image_embeds",
"image_grid_thw"}` / `{"video_embeds", "video_grid_thw", "second_per_grid_ts"}` for Qwen2-VL /
Qwen2.5-VL): the rows transformers' `get_image_features` / `get_video_features` make, given in
their place, yield the media's greedy tokens (M-RoPE positions from the grid, a video's time
steps from its seconds per grid step), one item or several in one dict, mixed with real media;
malformed inputs are refused naming them."""

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from polymodal import LLM, InvalidInputError, SamplingParams
from tests.helpers import tiny_checkpoint

MARK = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _image(seed, w=84, h=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _tower_rows(path, images) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' merged vision rows of `images` (one after another) and their grids."""
    processor = tf.AutoProcessor.from_pretrained(path)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    rows = out.pooler_output if hasattr(out, "pooler_output") else out
    rows = torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows
    return rows, inputs["image_grid_thw"]


def _tokens(llm, prompt) -> list[int]:
    return llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_given_rows_decode_as_the_image(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=128)
    one, two = _image(1), _image(2, 56, 84)
    rows, grids = _tower_rows(path, [one, two])
    first = int(grids[0].prod()) // 4
    text = "Look: " + MARK + " and " + MARK + " compare."
    want = _tokens(llm, {"prompt": text, "multi_modal_data": {"image": [one, two]}})
    both = {"image_embeds": rows, "image_grid_thw": grids}  # two images in one dict
    assert _tokens(llm, {"prompt": text, "multi_modal_data": {"image": both}}) == want
    each = [{"image_embeds": rows[:first], "image_grid_thw": grids[0]},
            {"image_embeds": rows[first:], "image_grid_thw": grids[1]}]  # fmt: skip
    assert _tokens(llm, {"prompt": text, "multi_modal_data": {"image": each}}) == want
    mixed = [each[0], two]  # given rows beside a real image
    assert _tokens(llm, {"prompt": text, "multi_modal_data": {"image": mixed}}) == want
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_usable_blocks


def test_bad_image_embeds_refused(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=64)
    hidden = llm.model_config.hidden_size
    grid = torch.tensor([1, 4, 4])  # 16 patches: 4 rows after the 2x2 merge
    cases = {
        "makes 4 rows": {"image_embeds": torch.randn(5, hidden), "image_grid_thw": grid},
        "hidden size": {"image_embeds": torch.randn(4, hidden + 2), "image_grid_thw": grid},
        "with image_grid_thw": {"image_embeds": torch.randn(4, hidden)},
        "unknown keys": {
            "image_embeds": torch.randn(4, hidden),
            "image_grid_thw": grid,
            "extra": 1,
        },  # fmt: skip
        "NaN or infinite": {
            "image_embeds": torch.full((4, hidden), float("inf")),
            "image_grid_thw": grid,
        },  # fmt: skip
    }
    for message, given in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            llm.generate({"prompt": MARK, "multi_modal_data": {"image": given}}, GREEDY)
    ok = {"image_embeds": torch.randn(4, hidden), "image_grid_thw": grid}
    assert len(_tokens(llm, {"prompt": MARK + "x", "multi_modal_data": {"image": ok}})) == 8


VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_given_video_rows_decode_as_the_video(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=128)
    frames = [np.asarray(_image(10 + i, 84, 56)) for i in range(4)]
    processor = tf.AutoProcessor.from_pretrained(path)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor.video_processor(videos=[np.stack(frames)], return_tensors="pt",
                                       input_data_format="channels_last")  # fmt: skip
    with torch.no_grad():
        out = hf.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    rows = out.pooler_output if hasattr(out, "pooler_output") else out
    rows = torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows
    text = "Watch: " + VIDEO + " then " + MARK + " now."
    image = _image(5)
    want = _tokens(llm, {"prompt": text, "multi_modal_data": {"video": [frames], "image": image}})
    processed = llm.processor.process(prompt=text, videos=[frames], images=[image])
    seconds = next(i for i in processed.mm_items if i.modality == "video").second_per_grid
    given = {"video_embeds": rows, "video_grid_thw": inputs["video_grid_thw"],
             "second_per_grid_ts": [seconds]}  # fmt: skip
    got = _tokens(llm, {"prompt": text, "multi_modal_data": {"video": given, "image": image}})
    assert got == want
    if arch == "qwen2_5_vl":  # another time step moves the positions: other tokens may follow
        other = llm.processor.process(
            prompt=text, videos=[{**given, "second_per_grid_ts": 4 * seconds}], images=[image]
        )
        assert other.positions != processed.positions
    with pytest.raises(InvalidInputError, match="second_per_grid_ts must be one positive"):
        bad = {**given, "second_per_grid_ts": [1.0, 2.0]}
        llm.generate({"prompt": text, "multi_modal_data": {"video": bad, "image": image}})
    with pytest.raises(InvalidInputError, match=r"video_grid_thw \[\[.*makes \d+ rows"):
        bad = {"video_embeds": rows[:-1], "video_grid_thw": inputs["video_grid_thw"]}
        llm.generate({"prompt": text, "multi_modal_data": {"video": bad, "image": image}})


def test_other_families_say_which_take_them(tmp_path_factory):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "llava_next")), device="cpu",
              num_kv_blocks=64)  # fmt: skip
    given = {"image_embeds": torch.randn(4, 8), "image_grid_thw": torch.tensor([1, 4, 4])}
    with pytest.raises(InvalidInputError, match="taken by Qwen2-VL / Qwen2.5-VL models"):
        llm.generate({"prompt": "<image>hi", "multi_modal_data": {"image": given}}, GREEDY)


def test_chat_parts_offline_and_served(tmp_path_factory):
    """An `image_embeds` message part (vLLM's): offline with tensors, served as base64
    `torch.save` files with `--enable-mm-embeds` (refused without it, naming the part)."""
    import base64
    import io

    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    image = _image(3)
    rows, grids = _tower_rows(path, [image])
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=64)

    def chat(part):
        return [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}]

    want = llm.chat(chat({"type": "image", "image": image}), GREEDY)[0].outputs[0]
    given = {"image_embeds": rows, "image_grid_thw": grids[0]}
    got = llm.chat(chat({"type": "image_embeds", "image_embeds": given}), GREEDY)[0]
    assert got.outputs[0].token_ids == want.token_ids

    pytest.importorskip("fastapi")
    from tests.sdk.server_process import post, tiny_server

    def b64(tensor) -> str:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return base64.b64encode(buffer.getvalue()).decode()

    encoded = {"image_embeds": b64(rows), "image_grid_thw": b64(grids[0])}
    part = {"type": "image_embeds", "image_embeds": encoded}
    body = {"model": "m", "messages": chat(part), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    args = ("--enable-mm-embeds", "--dtype", "float32", "--num-kv-blocks", "64")
    with tiny_server(tmp_path_factory, *args) as url:
        reply = post(url, "/v1/chat/completions", body).json()
        assert reply["choices"][0]["message"]["content"] == want.text
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "32") as url:
        refused = post(url, "/v1/chat/completions", body).json()["error"]
        assert "--enable-mm-embeds" in refused["message"]
        assert refused["param"] == "messages[0].content[0]"
