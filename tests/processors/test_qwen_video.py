"""Video parity with transformers' `Qwen2VLVideoProcessor` (torchvision backend, the only one).

transformers 5.17 cannot decode a file itself here (it wants torchcodec), so the reference gets
the very frames decord returns at the indices its own `sample_frames` picks; our processor
decodes the file itself. Pixel values must be within 1e-5, grids and token ids identical.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.processors import QwenVLProcessor, load_video

ARCHS = ["qwen2_vl", "qwen2_5_vl"]


def _reference_frames(path, hf_video_processor, **sampling):
    """decord frames at the reference's sampled indices, plus its metadata."""
    import decord
    from transformers.video_utils import VideoMetadata

    reader = decord.VideoReader(path)
    metadata = VideoMetadata(total_num_frames=len(reader), fps=reader.get_avg_fps())
    indices = hf_video_processor.sample_frames(metadata, **sampling)
    metadata.frames_indices = indices
    return reader.get_batch(indices.tolist()).asnumpy(), metadata


def _messages(video, text="What is in the video?"):
    return [
        {
            "role": "user",
            "content": [{"type": "video", "video": video}, {"type": "text", "text": text}],
        }
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sampling", [{"fps": 4}, {"num_frames": 10}, {"fps": 1}])
def test_video_file_matches_hf(arch, sampling, video_file, hf_processors, our_processors):
    hf_proc, ours = hf_processors[arch], our_processors[arch]
    frames, metadata = _reference_frames(video_file, hf_proc.video_processor, **sampling)
    messages = _messages(video_file)
    text = hf_proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf_proc(
        text=[text],
        videos=[frames],
        video_metadata=[metadata],
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    result = ours.process(messages=messages, **sampling)
    (item,) = result.mm_items
    assert result.token_ids == ref["input_ids"][0].tolist()
    assert item.modality == "video"
    assert item.data["grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert (item.pixel_values() - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    # seconds per temporal grid step, as Qwen2_5_VLProcessor derives it from the metadata
    assert item.second_per_grid == pytest.approx(2 / metadata.sampled_fps)
    assert item.num_slots == int(item.data["grid_thw"].prod()) // 4


def test_frame_lists_match_hf_video_processor(photos, hf_processors, our_processors):
    """PIL / numpy frames, grayscale and transparent RGBA (blended onto white for videos)."""
    hf_video, ours = hf_processors["qwen2_vl"].video_processor, our_processors["qwen2_vl"]
    base = photos["coffee"].resize((150, 100))
    rgb = [base.rotate(5 * i) for i in range(5)]  # odd count: the last frame is repeated
    gray = [np.asarray(frame.convert("L")) for frame in rgb[:4]]
    rgba = [np.asarray(photos["coffee_rgba"].resize((150, 100)))] * 2
    for frames in (rgb, gray, rgba):
        # the reference takes one [T, H, W, C] array (it cannot batch lists of 2-D frames)
        stacked = np.stack([np.asarray(frame) for frame in frames])
        stacked = stacked[..., None] if stacked.ndim == 3 else stacked
        ref = hf_video(
            videos=[stacked],
            input_data_format="channels_last",
            return_tensors="pt",
            cap_pixels_per_frame=False,
        )
        marker = "<|vision_start|><|video_pad|><|vision_end|>"
        (item,) = ours.process(prompt=f"{marker}Hi", videos=[frames]).mm_items
        assert item.data["grid_thw"].tolist() == ref["video_grid_thw"].tolist()
        diff = (item.pixel_values() - ref["pixel_values_videos"]).abs().max().item()
        assert diff <= 1e-5
        assert item.second_per_grid == pytest.approx(2 / 24)  # transformers' default frame rate


def test_total_pixel_budget_and_max_frames_match_hf(video_file, hf_processors, our_processors):
    hf_video, base = hf_processors["qwen2_5_vl"].video_processor, our_processors["qwen2_5_vl"]
    # qwen-vl-utils' cap: every frame gets an even share of a whole-video token budget
    budget_tokens = 20
    config = dataclasses.replace(
        base.config, video_total_pixels=int(budget_tokens * 28 * 28 * 0.9), max_frames=8
    )
    ours = QwenVLProcessor(base.tokenizer, config)
    frames, _ = _reference_frames(video_file, hf_video, fps=12, max_frames=8)
    assert len(frames) == 8  # max_frames clamped the 36 frames asked for
    # the reference's resize reads the budget from the instance, not from the call's kwargs
    hf_video = copy.deepcopy(hf_video)
    hf_video.max_video_tokens = budget_tokens
    ref = hf_video(videos=[frames], cap_pixels_per_frame=True, return_tensors="pt")
    (item,) = ours.process(
        prompt="<|vision_start|><|video_pad|><|vision_end|>", videos=[video_file], fps=12
    ).mm_items
    assert item.data["grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert (item.pixel_values() - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    uncapped = QwenVLProcessor(base.tokenizer, dataclasses.replace(config, video_total_pixels=None))
    (big,) = uncapped.process(
        prompt="<|vision_start|><|video_pad|><|vision_end|>", videos=[video_file], fps=12
    ).mm_items
    assert big.num_slots > item.num_slots  # the cap really bound


@pytest.mark.parametrize("sampling", [{"fps": 4}, {"num_frames": 10}, {"fps": 1}, {}])
def test_pyav_reads_what_decord_reads(video_file, monkeypatch, sampling):
    """Without decord (aarch64, macOS) video files decode with PyAV: the same frame count,
    rate, sampled indices and pixels (both are FFmpeg)."""
    with_decord = load_video(video_file, **sampling)
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    with_pyav = load_video(video_file, **sampling)
    assert with_pyav.sampled_fps == pytest.approx(with_decord.sampled_fps)
    assert torch.equal(with_pyav.frames, with_decord.frames)


def test_no_video_decoder_is_a_clear_error(video_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="decord or PyAV"):
        load_video(video_file)
    # frames given directly need no decoder
    frames = [Image.new("RGB", (56, 56), (i * 40, 0, 0)) for i in range(4)]
    assert load_video(frames).frames.shape == (4, 3, 56, 56)
    assert load_video(torch.zeros(2, 56, 56, 3, dtype=torch.uint8)).frames.shape == (2, 3, 56, 56)


def test_rgb_frames_read_in_place_equal_a_copy():
    """A list of RGB PIL frames is stacked from Pillow's own RGBX memory (one dense copy a
    frame); the frames equal those of the copying path (`np.asarray`)."""
    from PIL import Image

    from polymodal.processors import hashing
    from polymodal.processors.video import frames_from_list

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)) for _ in range(3)]
    viewed = frames_from_list(frames, 10**6)
    assert viewed.shape == (3, 3, 30, 44) and viewed.stride()[-1] == 4  # RGB of RGBX bytes
    hashing.USE_PIXEL_VIEWS = False
    try:
        copied = frames_from_list(frames, 10**6)
    finally:
        hashing.USE_PIXEL_VIEWS = True
    assert copied.stride()[-1] == 3
    assert torch.equal(viewed, copied)
