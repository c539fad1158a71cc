"""Long videos in pieces (Qwen-VL): the towers compute each temporal patch (frame pair) alone, so
the engine cuts a video longer than its encoder budget into pieces of whole temporal patches
(`split_media`); the rows, and the greedy tokens, are those of the whole video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.encoders.qwen2_5_vl import window_partition
from polymodal.encoders.vision_layers import full_attention_meta
from tests.helpers import record_logits, tiny_checkpoint

ARCHS = ["qwen2_vl", "qwen2_5_vl"]
CPU = torch.device("cpu")


def _video(num_frames: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (42, 56, 3)  # the tiny processor makes 56 x 56 frames: 4 slots a temporal patch
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(num_frames)]


def _messages(video) -> list[dict]:
    parts = [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module", params=ARCHS)
def llm(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, request.param)
    return LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=128)


def _video_item(llm, num_frames: int, seed: int = 0):
    prompt = llm.processor.process(messages=_messages(_video(num_frames, seed)))
    (item,) = prompt.mm_items
    return item


@pytest.mark.parametrize("grid", [[[5, 6, 8]], [[1, 4, 4], [3, 10, 14], [2, 2, 2]]])
def test_attention_segments_stay_inside_one_temporal_patch(grid):
    """What makes the pieces exact: every segment boundary list holds each temporal patch's
    edges, and the window order keeps every merged patch inside its own temporal patch."""
    frame_sizes = [h * w for t, h, w in grid for _ in range(t)]
    edges = set(np.cumsum([0, *frame_sizes]).tolist())
    assert edges <= set(full_attention_meta(grid, CPU).cu_seqlens.tolist())
    index, meta = window_partition(grid, 2, 2, CPU)  # windows of 2 x 2 merged patches
    assert edges <= set(meta.cu_seqlens.tolist())
    merged = torch.tensor(frame_sizes) // 4
    frame_of = torch.repeat_interleave(torch.arange(len(frame_sizes)), merged)
    assert torch.equal(frame_of[index], frame_of)


@pytest.mark.parametrize("staged", [False, True])
def test_pieces_give_the_rows_of_the_whole_video(llm, staged):
    model = llm.engine.runner.model
    item = _video_item(llm, 14)  # 7 temporal patches of 4 slots
    assert item.data["grid_thw"].tolist() == [[7, 4, 4]] and item.num_slots == 28
    if staged:
        model.stage([item])
    pieces = model.split_media([item], max_rows=12)  # 3 temporal patches a piece
    assert [p.data["grid_thw"].tolist() for p in pieces] == [[[3, 4, 4]], [[3, 4, 4]], [[1, 4, 4]]]
    assert [(p.slot_start, p.num_slots) for p in pieces] == [
        (item.slot_start, 12), (item.slot_start + 12, 12), (item.slot_start + 24, 4)
    ]  # fmt: skip
    assert len({p.content_hash for p in pieces} | {item.content_hash}) == 4
    with torch.no_grad():
        whole = model.encode([item])[0]
        parts = torch.cat(model.encode(pieces))
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    # the same video in one piece, and an image, come back as they are
    image = llm.processor.process(prompt="<|vision_start|><|image_pad|><|vision_end|>", images=[
        _video(1, 1)[0]
    ]).mm_items[0]  # fmt: skip
    assert model.split_media([item, image], max_rows=28) == [item, image]


def test_a_tower_that_attends_across_frames_gets_videos_whole(llm, monkeypatch):
    model = llm.engine.runner.model
    monkeypatch.setattr(type(model.visual), "frames_attend_alone", False)
    item = _video_item(llm, 8)
    assert model.split_media([item], max_rows=4) == [item]


def test_engine_encodes_a_long_video_in_budgeted_pieces_with_the_same_tokens(llm):
    """Budget 8 encoder rows a step for a 40-slot video: the tower never sees more than 8 rows
    (2 temporal patches) in one call, and the greedy tokens and logits equal those of the
    video encoded whole. (Not compared with transformers here: its v5 `get_rope_index` starts
    the text after a video at max(h, w), not past the video's temporal positions as Qwen's own
    code and this processor do, so the two differ once t > max(h, w) / merge.)"""
    video = _video(20, 3)  # 10 temporal patches of 4 slots
    path = str(llm.engine.model_config.model_dir)
    small = LLM(path, dtype="float32", device="cpu", num_kv_blocks=128, max_num_encoder_tokens=8)
    calls = []
    tower = small.engine.runner.model.visual
    tower.register_forward_hook(lambda mod, args, out: calls.append(int(args[1].prod(-1).sum())))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    runs = []
    for engine in (small, llm):
        seen = record_logits(engine.engine)
        out = engine.generate({"messages": _messages(video)}, params)[0].outputs[0].token_ids
        runs.append((out, torch.stack([rows[0] for rows in seen])))
    assert calls == [8 * 4] * 5  # patches: 4 a slot
    (pieces, pieces_logits), (whole, whole_logits) = runs
    assert pieces == whole
    torch.testing.assert_close(pieces_logits, whole_logits, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_pieces_on_cuda_with_encoder_graphs_give_the_same_tokens(arch, tmp_path_factory):
    """On CUDA (Triton attention, decoder and encoder graphs: the pieces repeat one layout, so
    their tower call is captured and replayed) the pieces' tokens equal the whole video's."""
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    video = _video(24, 5)  # 12 temporal patches of 4 slots: 6 pieces of 8 rows
    outs = []
    for budget in (8, None):
        llm = LLM(path, dtype="float32", device="cuda", max_num_encoder_tokens=budget)
        outs.append([
            llm.generate({"messages": _messages(video)}, params)[0].outputs[0].token_ids
            for _ in range(2)  # the second run: prefix-cache hit on the pieces' blocks
        ])  # fmt: skip
        del llm
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]
