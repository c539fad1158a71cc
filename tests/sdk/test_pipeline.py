"""Pipeline as a user calls it: keywords, lists, video, streaming, typed results, bad requests."""

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import InvalidInputError, Pipeline
from polymodal.llm_core.layers.embedding import merge_multimodal_embeddings
from tests.helpers import tiny_checkpoint

GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


def _image(seed, w=84, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    return Pipeline(str(path), dtype="float32", device="cpu", num_kv_blocks=128)


def test_keywords_video_and_typed_result(pipe):
    frames = [_image(10 + i) for i in range(4)]
    result = pipe(video=frames, text="What happens?", fps=2.0, **GREEDY)
    assert result.finish_reason == "length" and len(result.token_ids) == 8
    assert result.usage.completion_tokens == 8 and result.usage.prompt_tokens > 20
    assert result.timings.total > 0 and result.timings.time_to_first_token > 0
    two = pipe(images=[_image(1), _image(2)], text="Compare.", **GREEDY)
    one = pipe(image=_image(1), text="Compare.", **GREEDY)
    small = pipe(image=_image(1), text="Compare.", max_pixels=56 * 56, **GREEDY)
    assert two.usage.prompt_tokens > one.usage.prompt_tokens > small.usage.prompt_tokens


def test_stream_matches_call(pipe):
    result = pipe(image=_image(3), text="Describe.", **GREEDY)
    assert "".join(pipe.stream(image=_image(3), text="Describe.", **GREEDY)) == result.text


def test_batch_list_keeps_order(pipe):
    singles = [pipe(image=_image(s), text="Describe.", **GREEDY).token_ids for s in (4, 5)]
    requests = [
        {"image": _image(4), "text": "Describe."},
        {"image": _image(5), "text": "Describe."},
    ]
    batch = pipe(requests, **GREEDY)
    assert [r.token_ids for r in batch] == singles


def test_bad_requests_name_the_problem(pipe):
    with pytest.raises(InvalidInputError, match="nothing to do"):
        pipe(**GREEDY)
    with pytest.raises(InvalidInputError, match="top_p"):
        pipe(text="hi", top_p=7.0)
    with pytest.raises(InvalidInputError, match="image= or images="):
        pipe(image=_image(1), images=[_image(2)], text="x")


def test_slot_count_mismatch_is_named():
    embeds = torch.zeros(10, 8)
    with pytest.raises(InvalidInputError, match="5 slot tokens .* produced 4 embeddings"):
        merge_multimodal_embeddings(embeds, torch.arange(5), torch.ones(4, 8))
