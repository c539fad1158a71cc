"""`LLM`'s load-time warm-up: one short request of each kind the model takes, so that the
first user request is as fast as the tenth."""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from PIL import Image

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from polymodal.llm import LLM


def warm_up(llm: LLM) -> float:
    """Run one short request of each kind `llm`'s model takes (text, sampled and greedy; two
    448x448 JPEGs, a 500x333 one and a video for a multimodal model) through the whole path, so
    that what compiles, captures or allocates on first use (Triton kernels, the tower's CUDA
    graph of that layout, the sampler's kernels, cuBLAS plans, the pinned ring, the JPEG
    decoder, the GPU resize of an odd size, the chat template) does it now. Returns the
    seconds it took."""
    start = time.perf_counter()
    if llm.engine.task != "generate":  # pooling models: no sampling path to warm
        return 0.0
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    first = max(0, min(100, llm.model_config.vocab_size - 16))
    ids = list(range(first, first + 16))  # token ids: no tokenizer needed
    # the sampling path too (softmax, top-k/p, a seeded draw): greedy rows take the argmax
    # inside the decode graph, and the first sampled request paid ~60 ms of CUDA's lazy
    # kernel loading (H200, first Pipeline call at the default temperature)
    sampled = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=0, max_tokens=2, ignore_eos=True
    )
    llm.generate(ids, sampled, use_tqdm=False)
    prompts: list[Any] = [ids]
    if llm.is_multimodal and llm.tokenizer is not None:
        # encoded files, as users send: the decoder plugins load on first use. Two of one
        # size, different content (the same bytes would hit the encoder cache): a tower
        # with CUDA graphs captures a layout on its second call
        # A third of a photo's odd size: its GPU resize passes compile now (448 needs none)
        for colour, size in (((120, 60, 200), (448, 448)), ((30, 160, 90), (448, 448)),
                             ((200, 40, 40), (500, 333))):  # fmt: skip
            buffer = io.BytesIO()
            Image.new("RGB", size, colour).save(buffer, format="JPEG")
            image = {"type": "image", "image": buffer.getvalue()}
            prompts.append(
                [{"role": "user", "content": [image, {"type": "text", "text": "Warm up."}]}]
            )
        frames = [Image.new("RGB", (224, 224), (i * 40, 90, 30)) for i in range(4)]
        video = {"type": "video", "video": frames}
        prompts.append([{"role": "user", "content": [video, {"type": "text", "text": "Warm up."}]}])
    for prompt in prompts:  # one at a time: each kind runs as a first request would
        try:
            llm.generate(prompt, params, use_tqdm=False)
        except InvalidInputError:  # this model has no chat template: text alone then
            continue
    return time.perf_counter() - start
