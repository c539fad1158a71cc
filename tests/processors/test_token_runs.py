"""`RunEncoder`: runs of an embed token tokenized as one give the ids of the whole text."""

import pytest

from polymodal.demo_model import build_tokenizer
from polymodal.processors.token_runs import RunEncoder, is_atomic

SOFT, BOI, EOI = "<image_soft_token>", "<start_of_image>", "<end_of_image>"


@pytest.fixture(scope="module")
def tokenizer():
    roles = {"image_token": SOFT, "boi_token": BOI, "eoi_token": EOI, "a": "<x", "b": "<x>"}
    return build_tokenizer(tokens=roles)


def ids_of(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


TEXTS = [
    f"user\n\n\n{BOI}{SOFT * 256}{EOI}\n\nDescribe this image.",
    f"two:{BOI}{SOFT * 3}{EOI} and {BOI}{SOFT * 5}{EOI}{SOFT}",  # a run, then a single one
    f"{SOFT * 4}{BOI}{SOFT * 2}",  # runs at the ends
    f"stray {SOFT} in the user's text, {SOFT}{SOFT} twice",
    "no media at all",
    "",
]


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_the_whole_text(tokenizer, text, special):
    encoder = RunEncoder(tokenizer, ids_of(tokenizer, SOFT, BOI))
    assert encoder.id_of == {SOFT: ids_of(tokenizer, SOFT)[0], BOI: ids_of(tokenizer, BOI)[0]}
    assert encoder.encode(text, special) == tokenizer.encode(text, add_special_tokens=special)


def test_collapsed_text_is_what_the_tokenizer_sees(tokenizer, monkeypatch):
    """The point of it: the tokenizer gets one soft token per run."""
    encoder = RunEncoder(tokenizer, ids_of(tokenizer, SOFT))
    seen = []
    encode = tokenizer.encode
    monkeypatch.setattr(
        tokenizer, "encode", lambda text, **kw: seen.append(text) or encode(text, **kw)
    )
    ids = encoder.encode(TEXTS[0], False)
    assert seen == [TEXTS[0].replace(SOFT * 256, SOFT)]
    assert ids.count(ids_of(tokenizer, SOFT)[0]) == 256


def test_ordinary_tokens_are_never_collapsed(tokenizer):
    """A vocabulary token merges with its neighbours ("in" into "ing"), even one that repeats
    cleanly ("a" + "in" * 3 + "b"): not atomic, left alone."""
    word = tokenizer.encode("in", add_special_tokens=False)
    assert len(word) == 1
    three = tokenizer.encode("a" + "in" * 3 + "b", add_special_tokens=False)
    assert three.count(word[0]) == 3  # the probe alone would take it
    assert not is_atomic(tokenizer, "in", word[0])
    encoder = RunEncoder(tokenizer, word + [-1])
    assert encoder.pattern is None
    text = "ininining in"
    assert encoder.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)


def test_runs_that_do_not_encode_as_their_token_fall_back(tokenizer):
    """`<x` is a prefix of the token `<x>`: "<x<x>" collapses to "<x>", another token; the
    encoder notices and encodes the whole text."""
    encoder = RunEncoder(tokenizer, ids_of(tokenizer, "<x", "<x>"))
    assert set(encoder.id_of) == {"<x", "<x>"}
    for text in ["<x<x>", "<x<x<x> <x><x>", "<x><x<x"]:
        assert encoder.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)
