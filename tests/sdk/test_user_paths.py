"""One path, one result: `Pipeline` (one call and a batch), `polymodal caption`'s job and the
AsyncEngine (in-process and in its engine process) give `LLM.generate`'s greedy tokens on the
same image requests."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.async_engine import AsyncEngine
from polymodal.caption import DEFAULT_PROMPT, build_prompt, caption_files
from polymodal.caption_io import read_records
from polymodal.pipeline import Pipeline
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.new("RGB", (36 + 7 * i, 30 + 3 * i), (40 * i, 200 - 30 * i, 90)).save(path)
        paths.append(str(path))
    llm = LLM(ckpt, num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=7)
    prompts = [build_prompt(p, DEFAULT_PROMPT, {}) for p in paths]
    reference = [out.outputs[0] for out in llm.generate(prompts, params)]
    return ckpt, llm, paths, params, prompts, reference


def test_pipeline_one_call_and_batch(setup):
    ckpt, llm, paths, params, _, reference = setup
    pipe = Pipeline.__new__(Pipeline)
    pipe.llm = llm  # the same engine: no second model in memory
    text = DEFAULT_PROMPT.format(kind="image")
    one = pipe(image=paths[0], text=text, temperature=0.0, max_tokens=7)
    assert one.token_ids == reference[0].token_ids
    batch = pipe([{"image": p, "text": text} for p in paths], temperature=0.0, max_tokens=7)
    assert [r.token_ids for r in batch] == [r.token_ids for r in reference]


def test_caption_job(setup, tmp_path):
    _, llm, paths, params, _, reference = setup
    out = tmp_path / "captions.jsonl"
    caption_files(llm, paths, out, params=params, progress=False)
    captions = {r["key"]: r["caption"] for r in read_records(out)}
    assert [captions[p] for p in paths] == [r.text for r in reference]


@pytest.mark.parametrize("separate_process", [False, True])
def test_async_engine(setup, separate_process):
    ckpt, llm, _, params, prompts, reference = setup
    engine = AsyncEngine(ckpt if separate_process else llm, num_kv_blocks=256)

    async def main():
        return await asyncio.gather(*(engine.generate(p, params) for p in prompts))

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        engine.close()  # in-process: stops the engine thread, the LLM stays
    assert [o.outputs[0].token_ids for o in outs] == [r.token_ids for r in reference]
