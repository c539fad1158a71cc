"""VILA / NVILA processor against the public code's preprocessing (`vila_reference.py`: PIL tiles
and `SiglipImageProcessor` per view): the same views (pixel values within 1e-6) for NVILA's
dynamic-S2 tiles, NVILA-Lite's dynamic tiles + thumbnail, VILA 1.5's resized / padded view and
NVILA's single views when a prompt has several images, at the tiny checkpoints' sizes and the
released ones (448 px, scales 448 / 896 / 1344, 12 tiles; 384 px); the released token counts;
VILA's frame choice; the conversation formats of tokenizers without a chat template; and the
errors a user can cause."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from polymodal.bench.vila_reference import VICUNA_SYSTEM, VilaReference
from polymodal.llm_core.errors import MediaError
from polymodal.processors.media import to_rgb
from polymodal.processors.vila import VilaProcessor, vila_frame_indices
from polymodal.processors.vila_chat import CONVERSATION_TEMPLATES, conversation_template
from tests.helpers import tiny_checkpoint

SIGLIP_448 = dict(model_type="siglip_vision_model", image_size=448, patch_size=14, hidden_size=1152)
SIGLIP_384 = {**SIGLIP_448, "image_size": 384}
RELEASED = {  # name: (tiny base, config.json fields, vision tower fields)
    "nvila@448": (
        "nvila",
        dict(
            image_aspect_ratio="dynamic_s2", dynamic_s2=True, s2_scales="448,896,1344",
            s2_resize_output_to_scale_idx=-1, max_tiles=12, num_video_frames=32,
            mm_projector_cfg={"mm_projector_type": "mlp_downsample"},
            video_encoder=json.dumps(
                {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}
            ),
        ),
        SIGLIP_448,
    ),
    "nvila_lite@448": (
        "nvila_lite",
        dict(
            image_aspect_ratio="dynamic", min_tiles=1, max_tiles=12, dynamic_s2=False,
            mm_projector_cfg={"mm_projector_type": "mlp_downsample_3x3_fix"},
        ),
        SIGLIP_448,
    ),
    "vila1.5@384": ("vila1.5", dict(image_aspect_ratio="resize"), SIGLIP_384),
    "vila_pad@384": ("vila1.5", dict(image_aspect_ratio="pad"), SIGLIP_384),
}  # fmt: skip
VARIANTS = ["nvila", "nvila_lite", "vila1.5", *RELEASED]
CASES = [["astronaut"], ["coffee"], ["rocket_tall"], ["astronaut_wide"], ["tiny"], ["coffee_rgba"]]
CASES += [["hopper", "chelsea"], ["camera", "tiny", "astronaut_wide"]]


def _released(tmp_path_factory, name: str):
    """A config-only checkpoint at the released sizes: the tiny one's tokenizer (`llm/`)."""
    base, fields, vision = RELEASED[name]
    src = tiny_checkpoint(tmp_path_factory, base)
    out = tmp_path_factory.mktemp(name.replace("@", "_"))
    shutil.copytree(src / "llm", out / "llm")
    (out / "vision_tower").mkdir()
    shutil.copy(src / "vision_tower" / "preprocessor_config.json", out / "vision_tower")
    pre = json.loads((out / "vision_tower" / "preprocessor_config.json").read_text())
    side = int(fields.get("s2_scales", "0").split(",")[0]) or vision["image_size"]
    pre["size"] = {"height": side, "width": side}
    (out / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(pre))
    config = json.loads((src / "config.json").read_text())
    config.update(fields, vision_tower_cfg=vision)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def processors(request, tmp_path_factory):
    name = request.param
    if name in RELEASED:
        path = _released(tmp_path_factory, name)
    else:
        path = tiny_checkpoint(tmp_path_factory, name)
    return name, VilaProcessor.from_pretrained(path), VilaReference(path, models=False)


def _messages(images):
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe this."}]}]


@pytest.mark.parametrize("names", CASES, ids="+".join)
def test_views_match_the_reference(processors, photos, names):
    _, ours, ref = processors
    images = [photos[n] for n in names]
    out = ours.process(messages=_messages(images))
    # the public code converts with PIL (dropping alpha) whatever transformers does; ours
    # composites onto white (docs/models.md, deliberate differences): give the reference that
    seen = [to_rgb(im) for im in images]
    aspect = ref.cfg["image_aspect_ratio"]
    if len(seen) == 1 and aspect == "dynamic_s2":
        views, block = ref.s2_views(seen[0])
        assert out.mm_items[0].data["block_size"].tolist() == list(block)
        expected = [views]
    elif len(seen) == 1 and aspect == "dynamic":
        expected = [ref.dynamic_views(seen[0])]
    else:
        expected = [ref.single(im)[None] for im in seen]
    assert len(out.mm_items) == len(expected)
    for item, views in zip(out.mm_items, expected):
        pixels = item.pixel_values()
        assert pixels.shape == views.shape
        torch.testing.assert_close(pixels, views, rtol=0, atol=1e-6)


def test_released_token_counts(tmp_path_factory):
    """NVILA-8B: a square image alone is 3 x 3 tiles of 16 x 16 tokens (2304), a 16:9 one
    4 x 3 (3072); with a second image each is one 448 view (256); 32 frames pooled by 8 are 4 x
    256. NVILA-Lite: 11 x 11 tokens a view. VILA 1.5 at 384 px: 14 x 14."""
    from PIL import Image

    def embeds(name, images=(), video=None):
        proc = VilaProcessor.from_pretrained(_released(tmp_path_factory, name))
        parts = [{"type": "image", "image": im} for im in images]
        if video is not None:
            parts.append({"type": "video", "video": video})
        out = proc.process(messages=[{"role": "user", "content": parts}])
        return [it.num_embeds for it in out.mm_items]

    square, wide = Image.new("RGB", (500, 500)), Image.new("RGB", (1920, 1080))
    frames = [np.full((64, 80, 3), i, np.uint8) for i in range(40)]
    assert embeds("nvila@448", [square]) == [2304]
    assert embeds("nvila@448", [wide]) == [3072]
    assert embeds("nvila@448", [square, wide]) == [256, 256]
    assert embeds("nvila@448", video=frames) == [4 * 256]
    assert embeds("nvila_lite@448", [wide]) == [121 * (8 + 1)]  # 4 x 2 tiles + thumbnail
    assert embeds("vila1.5@384", [wide]) == [196]


def test_frame_choice_follows_vila():
    spread = np.round(np.linspace(0, 99, 8)).astype(int).tolist()
    assert vila_frame_indices(100, 25.0, 8, 0.0) == spread
    assert vila_frame_indices(100, 25.0, 8, 2.0) == [0, 12, 25, 37, 50, 62, 75, 87]
    assert vila_frame_indices(100, 25.0, 3, 2.0) == [0, 12, 25]  # at most num_frames
    assert vila_frame_indices(3, 25.0, 6, 0.0) == [0, 0, 1, 1, 2, 2]  # repeats when short


def test_video_file_is_sampled_by_vila_rule(tmp_path_factory, video_file):
    proc = VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "nvila"))
    out = proc.process(prompt="<vila/video>What happens?", videos=[video_file])
    item = out.mm_items[0]
    assert item.modality == "video" and item.data["pixel_frames"].shape[0] == 4
    # 4 frames averaged in pairs: 2 x 4 tokens, each pooled frame followed by "\n"
    assert item.num_embeds == 8 and item.num_slots == 8 + 2 * len(proc.video_ids[1]) - 1


@pytest.mark.parametrize("mode", sorted(CONVERSATION_TEMPLATES))
def test_conversation_formats(tmp_path_factory, mode):
    """VILA's `conversation.py` styles, one user turn and the open assistant turn."""
    proc = VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "vila1.5"))
    turns = [{"role": "user", "content": "<image>Hi."}]
    text = proc.render_chat(turns, _template(CONVERSATION_TEMPLATES[mode]))
    expected = {
        "vicuna_v1": VICUNA_SYSTEM + " USER: <image>Hi. ASSISTANT:",
        "llama_3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a "
        "helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural "
        "language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>Hi.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "hermes-2": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        "<image>Hi.<|im_end|><|im_start|>assistant\n",
    }[mode]
    assert text == expected
    assert conversation_template("/models/VILA1.5-8b") == CONVERSATION_TEMPLATES["llama_3"]
    assert conversation_template("/tmp/x") == CONVERSATION_TEMPLATES["vicuna_v1"]


def _template(chat_template):
    from polymodal.processors.chat import ChatTemplateOptions

    return ChatTemplateOptions(chat_template=chat_template)


def test_user_errors_name_the_input(tmp_path_factory):
    proc = VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "nvila"))
    image = np.zeros((30, 30, 3), np.uint8)
    with pytest.raises(MediaError, match="2 images given but the prompt has 1"):
        proc.process(prompt="<image>Hi", images=[image, image])
    frames = [np.zeros((30, 30, 3), np.uint8)] * 3
    with pytest.raises(MediaError, match="num_frames as a multiple of 2"):
        proc.process(prompt="<vila/video>Hi", videos=[frames], num_frames=3)
    with pytest.raises(MediaError) as missing:
        proc.process(prompt="<vila/video>Hi", videos=["/nonexistent.mp4"])
    assert str(missing.value) == "video 1 ('nonexistent.mp4'): no such file: '/nonexistent.mp4'"


def test_hash_follows_what_the_encoder_sees(tmp_path_factory, photos):
    """An image alone is tiled, next to another it is one view: different hashes; the same
    image alone twice: one hash."""
    proc = VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "nvila"))
    alone = proc.process(messages=_messages([photos["coffee"]])).mm_items[0]
    again = proc.process(messages=_messages([photos["coffee"]])).mm_items[0]
    paired = proc.process(messages=_messages([photos["coffee"], photos["tiny"]])).mm_items[0]
    assert alone.content_hash == again.content_hash != paired.content_hash


@pytest.mark.parametrize("arch", ["nvila", "vila1.5"])
def test_tokenized_prompt_expands_like_the_text(tmp_path_factory, photos, arch):
    """`prompt_token_ids` with `<image>` / `<vila/video>` ids give the text path's ids."""
    from polymodal.processors.chat import MediaRef

    proc = VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, arch))
    frames = [np.full((30, 40, 3), i * 20, np.uint8) for i in range(8)]
    text = "<image>Look.<vila/video>And this?"
    by_text = proc.process(prompt=text, images=[photos["coffee"]], videos=[frames])
    ids = proc.tokenizer(text).input_ids
    refs = [MediaRef("image", photos["coffee"]), MediaRef("video", frames)]
    by_ids = proc.process_tokens(ids, refs)
    assert by_ids.token_ids == by_text.token_ids
    assert [i.content_hash for i in by_ids.mm_items] == [i.content_hash for i in by_text.mm_items]
