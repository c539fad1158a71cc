"""LLaVA-OneVision processor parity with transformers' `LlavaOnevisionProcessor` (torchvision image
and video processors): the same token ids, the same pixel values (max abs diff <= 1e-6), for one
image (anyres; maps over `anyres_max_9` resampled), several images (one view each), videos
(frame lists, `num_frames` sampling, files) and images with a video; at the tiny checkpoint's
35 px (grids up to 4 x 4) and at the released 384 px (36 pinpoints, 729 tokens a view)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.processors.llava_onevision import LlavaOnevisionProcessor, fit_to_max_tiles
from polymodal.processors.video import load_video
from tests.helpers import tiny_checkpoint
from tests.processors.conftest import as_reference_sees
from tests.sdk.vl_reference import random_image

ONE_IMAGE = ["astronaut", "camera", "coffee_rgba", "chelsea_palette", "rocket_tall", "tiny"]
SEVERAL = [["hopper", "rocket_tall", "astronaut_wide"], ["tiny", "coffee"]]
# 384 px views, 0.5 mean / std, the image processor's default 36 pinpoints (the hub's configs)
RELEASED = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module", params=["tiny", "released"])
def processors(request, tmp_path_factory):
    """(transformers' processor, ours) at one size."""
    import transformers as tf

    path = tiny_checkpoint(tmp_path_factory, "llava_onevision")
    hf = tf.AutoProcessor.from_pretrained(path)
    if request.param == "released":
        hf = tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(**RELEASED),
            video_processor=tf.LlavaOnevisionVideoProcessor(**RELEASED),
            tokenizer=hf.tokenizer,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            chat_template=hf.chat_template,
        )
        path = tmp_path_factory.mktemp("onevision_384")
        hf.save_pretrained(path)
        hf = tf.AutoProcessor.from_pretrained(path)
    return hf, LlavaOnevisionProcessor.from_pretrained(path)


def _messages(images, videos=()):
    parts = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


def _reference(hf, text, images, videos=(), **kwargs):
    """transformers on one sample: its images nested as `apply_chat_template` passes them."""
    return hf(
        text=[text],
        images=[[as_reference_sees(im) for im in images]] if images else None,
        videos=[list(v) for v in videos] or None,
        return_tensors="pt",
        **kwargs,
    )


def _check(ours, ref):
    assert ours.token_ids == ref["input_ids"][0].tolist()
    images = [item for item in ours.mm_items if item.modality == "image"]
    videos = [item for item in ours.mm_items if item.modality == "video"]
    if images:  # [images, max views, C, S, S], zero-padded views
        each = [item.pixel_values() for item in images]  # [views, C, S, S] each
        expected = torch.cat([ref["pixel_values"][i, : v.shape[0]] for i, v in enumerate(each)])
        got = torch.cat(each)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-6
    if videos:
        got = torch.stack([item.pixel_values() for item in videos])
        assert got.shape == ref["pixel_values_videos"].shape
        assert (got - ref["pixel_values_videos"]).abs().max().item() <= 1e-6
    for item in ours.mm_items:
        token = ours.token_ids[item.slot_start]
        assert item.num_slots == item.num_embeds  # one contiguous run of its own token
        assert ours.token_ids[item.slot_start : item.slot_end] == [token] * item.num_slots


def _chat(processors, images, videos=()):
    hf, ours = processors
    messages = _messages(images, videos)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    result = ours.process(messages=messages)
    _check(result, _reference(hf, text, images, videos))
    return result


@pytest.mark.parametrize("name", ONE_IMAGE)
def test_one_image_matches_hf(name, photos, processors):
    _chat(processors, [photos[name]])


def test_large_maps_are_resampled(photos, processors):
    """A large square photo takes a 4 x 4 grid: its unpadded map is more than nine tiles' worth,
    so it is resampled (and the token count still matches transformers')."""
    large = photos["astronaut"].resize((1200, 1200))
    layout = _chat(processors, [large]).mm_items[0].data["tile_layout"].tolist()
    rows, cols, _, height, _, width, out_height, out_width = layout
    assert rows * cols > 9 and (out_height, out_width) < (height, width)


@pytest.mark.parametrize("names", SEVERAL, ids="+".join)
def test_several_images_are_one_view_each(names, photos, processors):
    result = _chat(processors, [photos[n] for n in names])
    tokens = processors[1].num_image_tokens + 1  # a view and its newline
    assert [item.num_embeds for item in result.mm_items] == [tokens] * len(names)


def test_video_frames_match_hf(processors):
    frames = [random_image(50, 40, i) for i in range(5)]
    result = _chat(processors, [], [frames])
    side = processors[1].pooled_side
    assert result.mm_items[0].num_embeds == 5 * side * side + 1


def test_image_and_video_match_hf(photos, processors):
    """One image with a video is the prompt's only image: anyres."""
    result = _chat(processors, [photos["coffee"]], [[random_image(30, 60, i) for i in range(3)]])
    assert result.mm_items[0].pixel_values().shape[0] > 1


def test_num_frames_samples_as_hf(processors):
    hf, ours = processors
    frames = [random_image(50, 40, i) for i in range(10)]
    result = ours.process(prompt="<video>\nWhat happens?", videos=[frames], num_frames=4)
    ref = _reference(
        hf, "<video>\nWhat happens?", [], [frames], do_sample_frames=True, num_frames=4
    )
    _check(result, ref)


def test_raw_prompt_and_token_ids_match_hf(photos, processors):
    hf, ours = processors
    images = [photos["hopper"], photos["astronaut_wide"]]
    videos = [[random_image(40, 40, i) for i in range(2)]]
    prompt = "<video>\n<image>\n<image>\nWhat differs?"
    result = ours.process(prompt=prompt, images=images, videos=videos)
    _check(result, _reference(hf, prompt, images, videos))
    from polymodal.processors.chat import MediaRef

    refs = [MediaRef("image", im) for im in images] + [MediaRef("video", v) for v in videos]
    tokens = ours.process_tokens(ours.tokenizer.encode(prompt), refs)
    assert tokens.token_ids == result.token_ids
    assert [i.slot_start for i in tokens.mm_items] == [i.slot_start for i in result.mm_items]
    assert [i.modality for i in result.mm_items] == ["video", "image", "image"]  # prompt order


def test_video_file_takes_num_frames_evenly(video_file, processors):
    """A file's frames are sampled as transformers samples a frame list (checked above); 32 by
    default."""
    _, ours = processors
    everything = load_video(video_file, num_frames=36, temporal_patch_size=1).frames
    from_file = ours.process(prompt="<video>", videos=[video_file], num_frames=6).mm_items[0]
    from_list = ours.process(prompt="<video>", videos=[list(everything)], num_frames=6).mm_items[0]
    assert torch.equal(from_file.data["pixel_frames"], from_list.data["pixel_frames"])
    default = ours.process(prompt="<video>", videos=[video_file]).mm_items[0]
    assert default.data["pixel_frames"].shape[0] == 32


def test_anyres_max_geometry():
    assert fit_to_max_tiles(20, 20, 5, 9) == (15, 15)  # 16 tiles' worth: r = 4 / 3
    assert fit_to_max_tiles(13, 20, 5, 9) == (13, 20)  # r = 1.075: within 10%, kept
    assert fit_to_max_tiles(15, 20, 5, 9) == (12, 17)  # r = 1.155
    assert fit_to_max_tiles(81, 81, 27, 9) == (81, 81)  # exactly nine tiles
    assert fit_to_max_tiles(108, 162, 27, 9) == (66, 99)  # 24 tiles' worth: r = 1.633


def test_bad_video_input_names_it(processors):
    _, ours = processors
    frames = [random_image(20, 20, i) for i in range(3)]
    with pytest.raises(MediaError, match=r"1 video given but the prompt has 0 '<video>'"):
        ours.process(prompt="no marks", videos=[frames])
    with pytest.raises(MediaError, match=r"video 1 .*asked for 5 frames but the video has only 3"):
        ours.process(prompt="<video>", videos=[frames], num_frames=5)
    for bad in ("4", 0, 2.5):
        with pytest.raises(InvalidInputError, match="num_frames must be a positive integer"):
            ours.process(prompt="<video>", videos=[frames], num_frames=bad)
    with pytest.raises(InvalidInputError, match="do not apply"):
        ours.process(prompt="<video>", videos=[frames], fps=2)


def test_cached_image_keeps_its_prompt_mode(photos, processors):
    """The processed-input cache keys an image by how many images its prompt has: the same
    bytes are anyres alone and one view next to another image."""
    import io

    _, ours = processors
    buffer = io.BytesIO()
    photos["coffee"].save(buffer, format="PNG")
    data = buffer.getvalue()
    alone = ours.process(prompt="<image>", images=[data]).mm_items[0]
    pair = ours.process(prompt="<image><image>", images=[data, data]).mm_items
    again = ours.process(prompt="<image>", images=[data]).mm_items[0]
    assert alone.pixel_values().shape[0] > 1 and again.num_embeds == alone.num_embeds
    assert [item.num_embeds for item in pair] == [ours.num_image_tokens + 1] * 2
