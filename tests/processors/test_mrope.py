"""M-RoPE positions vs transformers' `Qwen2VLModel` / `Qwen2_5_VLModel` `.get_rope_index`.

transformers 5.17 departs from the original Qwen (and transformers 4.x / vLLM) rule in two
cases: it truncates `second_per_grid` to an int before scaling (fixed upstream in PR #48669),
and it starts the text after a video at `start + max(h, w)` instead of the video's largest
position + 1. We follow the original rule; the parity cases below are ones where both agree
(images always; videos with integer seconds per grid and few temporal steps), and
`test_video_time_scaling_follows_original_rule` pins the cases where they differ.
"""

from __future__ import annotations

import pytest
import torch

from polymodal.processors import MediaSpan, mrope_positions
from polymodal.processors.mrope import vision_positions

MARK_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MARK_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    """arch -> the tiny HF model's inner `Qwen2VLModel` / `Qwen2_5_VLModel` (has get_rope_index)."""
    from transformers import AutoModelForImageTextToText

    return {
        arch: AutoModelForImageTextToText.from_pretrained(path).model
        for arch, path in checkpoints.items()
    }


def _hf_positions(model, result, cfg):
    ids = torch.tensor([result.token_ids])
    token_type = torch.zeros_like(ids)
    token_type[ids == cfg.image_token_id] = 1
    token_type[ids == cfg.video_token_id] = 2
    grids = {
        m: [it.data["grid_thw"] for it in result.mm_items if it.modality == m]
        for m in ("image", "video")
    }
    kwargs = dict(
        mm_token_type_ids=token_type,
        image_grid_thw=torch.cat(grids["image"]) if grids["image"] else None,
        video_grid_thw=torch.cat(grids["video"]) if grids["video"] else None,
    )
    if cfg.model_type == "qwen2_5_vl":
        seconds = [it.second_per_grid for it in result.mm_items if it.modality == "video"]
        kwargs["second_per_grid_ts"] = torch.tensor(seconds) if seconds else None
    positions, delta = model.get_rope_index(ids, **kwargs)
    return positions[:, 0].tolist(), int(delta[0, 0])


def _frames(photos, count, size):
    return [photos["chelsea"].resize(size).rotate(3 * i) for i in range(count)]


CASES = {
    "text_only": lambda p: ("Hello, how are you today?", [], []),
    "one_image": lambda p: (f"Describe {MARK_IMAGE} now.", [p["astronaut"]], []),
    "three_images": lambda p: (
        f"A {MARK_IMAGE} B {MARK_IMAGE}{MARK_IMAGE} C",
        [p["hopper"], p["astronaut_wide"], p["tiny"]],
        [],
    ),
    # 4 frames at 2 fps: 1 s per grid step (integer, so transformers' int() is harmless)
    "one_video": lambda p: (
        f"What is in the video? {MARK_VIDEO} Answer:",
        [],
        [_frames(p, 4, (200, 150))],
    ),
    "image_and_video": lambda p: (
        f"{MARK_IMAGE} then {MARK_VIDEO} end",
        [p["coffee"]],
        [_frames(p, 2, (120, 90))],
    ),
}


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("case", list(CASES))
def test_positions_match_hf(arch, case, photos, our_processors, hf_models):
    ours = our_processors[arch]
    prompt, images, videos = CASES[case](photos)
    result = ours.process(prompt=prompt, images=images, videos=videos, fps=2)
    assert len(result.positions) == 3 and all(
        len(row) == len(result.token_ids) for row in result.positions
    )
    expected, expected_delta = _hf_positions(hf_models[arch], result, ours.config)
    assert result.positions == expected
    assert result.mrope_delta == expected_delta
    if case != "text_only":
        assert result.mrope_delta < 0  # media slots share positions, so decode starts earlier


def test_video_temporal_positions_are_scaled_for_qwen2_5(photos, our_processors):
    frames = _frames(photos, 4, (200, 150))
    prompt = f"x {MARK_VIDEO}"
    q2 = our_processors["qwen2_vl"].process(prompt=prompt, videos=[frames], fps=2)
    q25 = our_processors["qwen2_5_vl"].process(prompt=prompt, videos=[frames], fps=2)
    start, end = q2.mm_items[0].slot_start, q2.mm_items[0].slot_start + q2.mm_items[0].num_slots
    # grid t=2: Qwen2-VL steps the temporal row by 1, Qwen2.5-VL by 1 s * tokens_per_second (4)
    assert sorted(set(q2.positions[0][start:end])) == [start, start + 1]
    assert sorted(set(q25.positions[0][start:end])) == [start, start + 4]


def test_video_time_scaling_follows_original_rule():
    """A fractional interval (0.5 s per grid * 4 tokens/s = 2) and a long temporal extent."""
    # prompt: 2 text tokens, a video of grid (3, 4, 4) -> 3 x 2 x 2 slots, 1 text token
    positions, delta = mrope_positions(2 + 12 + 1, [MediaSpan(2, (3, 4, 4), 2.0)], merge_size=2)
    assert positions[0] == [0, 1] + [2] * 4 + [4] * 4 + [6] * 4 + [7]
    assert positions[1] == [0, 1] + [2, 2, 3, 3] * 3 + [7]
    assert positions[2] == [0, 1] + [2, 3, 2, 3] * 3 + [7]
    assert delta == 8 - 15
    # interval 0.75 -> floor(i * 0.75) = 0, 0, 1, 2 (the float product is truncated, not the step)
    positions, _ = mrope_positions(4, [MediaSpan(0, (4, 2, 2), 0.75)], merge_size=2)
    assert positions[0] == [0, 0, 1, 2]


def test_decode_position_rule(our_processors, photos):
    result = our_processors["qwen2_vl"].process(
        prompt=f"a {MARK_IMAGE} b", images=[photos["coffee"]]
    )
    # the first generated token comes right after the largest prompt position
    first_decode = len(result.token_ids) + result.mrope_delta
    assert first_decode == max(max(row) for row in result.positions) + 1


def test_cached_grid_rows_are_shared_read_only_and_offset_per_prompt():
    """Two prompts with the same grid at different starts (the rows come from one cached,
    read-only array): each gets its own offsets, and the cached rows stay relative."""
    a, _ = mrope_positions(1 + 4 + 1, [MediaSpan(1, (1, 4, 4), 1.0)], merge_size=2)
    b, _ = mrope_positions(3 + 4 + 1, [MediaSpan(3, (1, 4, 4), 1.0)], merge_size=2)
    assert a[1] == [0, 1, 1, 2, 2, 3] and a[2] == [0, 1, 2, 1, 2, 3]
    assert b[1] == [0, 1, 2, 3, 3, 4, 4, 5] and b[2] == [0, 1, 2, 3, 4, 3, 4, 5]
    rows = vision_positions((1, 4, 4), 2, 1.0)
    assert rows is vision_positions((1, 4, 4), 2, 1.0) and not rows.flags.writeable
    assert rows.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]]
