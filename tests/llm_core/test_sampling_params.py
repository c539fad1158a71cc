"""SamplingParams: defaults, normalization and one readable error per invalid field."""

import pytest

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.max_tokens == 256 and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("stop", "expected"), [(None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"])]
)
def test_stop_is_normalized_to_a_list(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_is_greedy_and_accepted_edges():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    # Boundary values that are allowed.
    p = SamplingParams(
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=20,
        max_tokens=None,
        seed=-5,
        stop_token_ids=None,
    )
    assert p.top_k == -1 and p.max_tokens is None and p.stop_token_ids == []
    assert SamplingParams(logprobs=0, max_tokens=1, n=1).logprobs == 0


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("n", 0, ">= 1"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("inf"), ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, ">= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", float("nan"), "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("max_tokens", 0, ">= 1"),
        ("stop", ["ok", ""], "empty"),
        ("stop_token_ids", [3, -1], ">= 0"),
        ("logprobs", -1, ">= 0"),  # the upper bound is the engine's max_logprobs
        ("prompt_logprobs", -2, ">= 0"),
    ],
)
def test_invalid_value_names_field_and_range(field, value, allowed):
    with pytest.raises(InvalidInputError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert msg.startswith(f"SamplingParams.{field} ")
    assert allowed in msg and "got" in msg


def test_message_is_readable():
    with pytest.raises(
        InvalidInputError, match=r"^SamplingParams.top_p must be in \(0, 1\], got 1.5$"
    ):
        SamplingParams(top_p=1.5)


def test_wrong_type_and_unknown_field():
    with pytest.raises(InvalidInputError, match="SamplingParams.top_k: .*integer"):
        SamplingParams(top_k="many")
    with pytest.raises(InvalidInputError, match="SamplingParams.tempreture is not a sampling"):
        SamplingParams(tempreture=0.5)


def test_error_is_a_value_error_for_callers_that_catch_builtin_errors():
    with pytest.raises(ValueError):
        SamplingParams(n=-1)
