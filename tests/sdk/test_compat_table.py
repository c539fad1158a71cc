"""The compatibility tables of docs/serving.md and docs/api.md say what the code does: every
request field, serve option, LLM keyword / method and SamplingParams field is listed, and
"supported" / "not supported" match the request models and signatures."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from polymodal import InvalidInputError, SamplingParams
from polymodal.llm_options import ENGINE_KEYWORDS, VLLM_DEFAULT_ONLY, VLLM_KEYWORDS

pytest.importorskip("fastapi")
from polymodal.server.cli import serve_command  # noqa: E402
from polymodal.server.pooling_requests import (  # noqa: E402
    ClassificationRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from polymodal.server.requests import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| `([^`]+)` \| (supported|not supported|default only) \|")


def table(doc: str, heading: str) -> dict[str, str]:
    """name -> status of the table under `heading`."""
    text = (DOCS / doc).read_text()
    assert heading in text, f"{doc} has no section {heading!r}"
    rows = {}
    for line in text[text.index(heading) :].splitlines()[1:]:
        if line.startswith("#"):
            break
        match = ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} listed twice under {heading}"
            rows[match.group(1)] = match.group(2)
    assert rows, f"no rows under {heading!r}"
    return rows


def split(rows: dict[str, str]) -> tuple[set[str], set[str]]:
    return (
        {n for n, s in rows.items() if s == "supported"},
        {n for n, s in rows.items() if s == "not supported"},
    )


@pytest.mark.parametrize(
    "heading, model, minimal",
    [
        ("### `POST /v1/chat/completions` fields", ChatCompletionRequest, {"messages": []}),
        ("### `POST /v1/completions` fields", CompletionRequest, {"prompt": "x"}),
        ("### `POST /tokenize` fields", TokenizeRequest, {}),
        ("### `POST /v1/embeddings` fields", EmbeddingRequest, {"input": "x"}),
        ("### `POST /pooling` fields", PoolingRequest, {"input": "x"}),
        ("### `POST /classify` fields", ClassificationRequest, {"input": "x"}),
        ("### `POST /score` fields", ScoreRequest, {"text_1": "a", "text_2": "b"}),
        ("### `POST /rerank` fields", RerankRequest, {"query": "a", "documents": ["b"]}),
    ],
)
def test_request_fields_match_the_serving_tables(heading, model, minimal):
    supported, refused = split(table("serving.md", heading))
    fields = {f.alias or name for name, f in model.model_fields.items()}
    assert supported == fields, f"supported in docs only: {supported - fields}; in code only: " \
        f"{fields - supported}"  # fmt: skip
    for name in refused:
        with pytest.raises(ValidationError) as err:
            model.model_validate({**minimal, name: None})
        kinds = {(e["type"], e["loc"][0]) for e in err.value.errors()}
        assert ("extra_forbidden", name) in kinds


def test_serve_options_match_the_table():
    parser = argparse.ArgumentParser()
    serve_command(parser)
    options = {s for action in parser._actions for s in action.option_strings}
    supported, refused = split(table("serving.md", "### `polymodal serve` options"))
    assert supported <= options, supported - options
    assert not refused & options


def test_llm_keywords_match_the_api_table():
    from polymodal.llm import LLM

    rows = table("api.md", "### `LLM(...)` keywords")
    supported, refused = split(rows)
    own = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    accepted = own | ENGINE_KEYWORDS | set(VLLM_KEYWORDS)
    assert supported <= accepted, supported - accepted
    assert {n for n, s in rows.items() if s == "default only"} == set(VLLM_DEFAULT_ONLY)
    from polymodal.llm_options import engine_config_kwargs

    for name in refused:
        assert name not in accepted | set(VLLM_DEFAULT_ONLY)
        with pytest.raises(InvalidInputError, match=name):
            engine_config_kwargs("m", {name: 1})


def test_llm_methods_match_the_api_table():
    from polymodal.llm import LLM

    supported, refused = split(table("api.md", "### `LLM` methods"))
    assert all(callable(getattr(LLM, name, None)) for name in supported)
    generative = object.__new__(LLM)  # no engine needed to be refused
    generative.model_config = SimpleNamespace(architecture="Qwen2ForCausalLM")
    for name in refused:
        method = getattr(LLM, name, None)
        if method is not None:  # present only to say why it is not available
            with pytest.raises(InvalidInputError, match="not supported"):
                method(generative, "text")


def test_sampling_params_fields_match_the_api_table():
    supported, refused = split(table("api.md", "### `SamplingParams` fields"))
    assert supported == set(SamplingParams.model_fields)
    for name in refused:
        with pytest.raises(InvalidInputError, match=f"{name} is not a sampling parameter"):
            SamplingParams(**{name: 1})


def test_vllm_media_path_spelling_is_the_media_dir():
    parser = argparse.ArgumentParser()
    serve_command(parser)
    args = parser.parse_args(["some/model", "--allowed-local-media-path", "/data"])
    assert args.allowed_media_dir == "/data"


def test_a_vllm_serve_command_line_parses_and_builds(tmp_path_factory):
    """The options vLLM users' launch scripts carry parse, and the engine keywords they give
    build an `LLM` that honours them (`limit_mm_per_prompt`, `mm_processor_kwargs`, the
    generation-config override); `--no-enable-chunked-prefill` is refused."""
    from polymodal import LLM
    from polymodal.engine_args import engine_kwargs
    from tests.helpers import tiny_checkpoint

    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    parser = argparse.ArgumentParser()
    serve_command(parser)
    argv = [ckpt, "--trust-remote-code", "--limit-mm-per-prompt", '{"image": 1}',
            "--mm-processor-kwargs", '{"max_pixels": 3136}', "--enable-prefix-caching",
            "--enable-chunked-prefill", "--block-size", "16", "--seed", "3",
            "--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "warning",
            "--tokenizer", ckpt, "--override-generation-config", '{"temperature": 0.5}',
            "--device", "cpu", "--num-kv-blocks", "64"]  # fmt: skip
    args = parser.parse_args(argv)
    assert (args.seed, args.log_level) == (3, "warning")
    kwargs = engine_kwargs(args)
    llm = LLM(ckpt, **kwargs, seed=args.seed)
    assert llm.get_default_sampling_params().temperature == 0.5
    assert llm.engine.config.block_size == 16 and llm.engine.config.enable_prefix_caching
    from PIL import Image

    img = Image.new("RGB", (112, 112))
    mark = "<|vision_start|><|image_pad|><|vision_end|>"
    small = llm.process({"prompt": mark + "hi", "images": [img]}, stage=False)
    assert len(small.token_ids) < 10  # max_pixels 3136: one 56x56 image, 4 tokens
    with pytest.raises(InvalidInputError, match="limit_mm_per_prompt"):
        llm.process({"prompt": mark * 2, "images": [img, img]}, stage=False)
    with pytest.raises(SystemExit, match="always splits long prompts"):
        engine_kwargs(parser.parse_args([ckpt, "--no-enable-chunked-prefill"]))
