"""`HCXVisionProcessor` against the published image processor (as `tests/sdk/hcx_reference.py`
rebuilds it with transformers' numpy transforms): pixel values within 1e-6 and the published
token count (`determine_anyres_num_vision_patches`, written out below) over many sizes, at the
tiny and the released sizes (378 px grids, 9 grids, 81 queries); and the geometry helpers."""

import json

import pytest
import torch

from polymodal.processors.hcx_vision import HCXVisionProcessor, possible_resolutions, unpad_box
from tests.sdk.hcx_reference import HCXReference, select_best_resolution
from tests.sdk.vl_reference import random_image

SIZES = [(90, 40), (20, 150), (56, 56), (9, 5), (378, 378), (1000, 300), (301, 1299), (777, 555)]


def published_count(image_size, cfg, resolutions, grid) -> int:
    """The hub's `determine_anyres_num_vision_patches` for an image ((h, w)), as read."""
    queries = cfg["num_queries_vis_abstractor_image"]
    if not cfg["anyres"]:
        return queries
    per_grid = int(queries**0.5)
    height, width = select_best_resolution(image_size, resolutions)
    rows, cols = (height // grid) * per_grid, (width // grid) * per_grid
    if cfg["unpad"]:
        h, w = image_size
        if w / h > cols / rows:
            rows -= (rows - int(h * (cols / w))) // 2 * 2
        else:
            cols -= (cols - int(w * (rows / h))) // 2 * 2
        count = rows * cols + rows
    else:
        count = rows * cols
    return count + per_grid**2


def reference_without_model(path) -> HCXReference:
    ref = HCXReference.__new__(HCXReference)
    ref.cfg = json.loads((path / "config.json").read_text())
    ref.pre = json.loads((path / "preprocessor_config.json").read_text())
    grid = ref.pre["crop_size"]["height"]
    n = ref.cfg["max_num_grids"]
    pairs = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= n]
    pairs = [p for p in pairs if p != (1, 1) or ref.cfg.get("use_1x1_grid")]
    ref.resolutions = ref.pre.get("possible_resolutions") or [
        [i * grid, j * grid] for i, j in pairs
    ]
    return ref


def released(tmp_path, unpad=True, pad_to_square=True):
    """A folder with the released processor settings (no weights: the processor reads none)."""
    cfg = dict(anyres=True, unpad=unpad, max_num_grids=9, num_queries_vis_abstractor_image=81,
               image_token_id=7)  # fmt: skip
    pre = dict(crop_size={"height": 378, "width": 378}, size={"shortest_edge": 378},
               image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
               pad_to_square=pad_to_square)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.helpers import tiny_checkpoint

    return [tiny_checkpoint(tmp_path_factory, arch) for arch in ("hcx_vision", "hcx_vision_plain")]


def check(processor, ref, sizes):
    grid = ref.pre["crop_size"]["height"]
    for i, (w, h) in enumerate(sizes):
        image = random_image(w, h, i)
        item, expansion = processor.image_item(image, {})
        pixels, _ = ref.preprocess(image)
        got = item.pixel_values()
        assert got.shape == pixels.shape, (w, h)
        torch.testing.assert_close(got, pixels.float(), rtol=0, atol=1e-6, msg=f"{(w, h)}")
        expected = published_count((h, w), ref.cfg, ref.resolutions, grid)
        assert item.num_embeds == expected == expansion.count(processor.placeholder), (w, h)


def test_tiny_checkpoints_match_the_published_processor(tiny_dirs):
    for path in tiny_dirs:
        processor = HCXVisionProcessor.from_pretrained(path)
        check(processor, reference_without_model(path), SIZES)


@pytest.mark.parametrize("unpad,pad_to_square", [(True, True), (False, False)])
def test_released_sizes_match_the_published_processor(tmp_path, unpad, pad_to_square):
    path = released(tmp_path, unpad, pad_to_square)
    processor = HCXVisionProcessor(None, model_dir=path)
    check(processor, reference_without_model(path), SIZES[:6])


def test_released_grids_and_counts():
    """9 grids of 378 px: 1 x 2 ... 9 x 1 (no 1 x 1), 1.29M pixels at most, as the model card."""
    grids = possible_resolutions(9, 378, False)
    assert (378, 378) not in grids and (378, 378 * 9) in grids and (378 * 3, 378 * 3) in grids
    assert max(h * w for h, w in grids) == 9 * 378 * 378 == 1_285_956
    assert len(grids) == sum(9 // i for i in range(1, 10)) - 1
    assert (378, 378) in possible_resolutions(9, 378, True)


def test_unpad_truncates_like_the_published_code():
    """`int(h * (cols / w))`, not rounded: 49 x 98 on a 2 x 2 map keeps no row (0.999...)."""
    assert unpad_box((49, 98), 2, 2) == (1, 0, 0, 2)
    assert unpad_box((40, 90), 6, 9) == (1, 4, 0, 9)  # wide: rows cut, int(40 * 9 / 90) = 4
    assert unpad_box((90, 40), 9, 6) == (0, 9, 1, 4)  # tall: columns cut
    assert unpad_box((50, 50), 6, 6) == (0, 6, 0, 6)  # the grid's own aspect: nothing cut
