"""IncrementalDetokenizer: matches full decode, stop strings across tokens, UTF-8 splits."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from polymodal.demo_model import build_tokenizer
from polymodal.llm_core.detokenizer import IncrementalDetokenizer
from polymodal.llm_core.sampling_params import SamplingParams

UNICODE_TEXT = "naïve café — 東京 🎉 ok ## ### done"


@pytest.fixture(scope="module")
def demo_tok():
    return build_tokenizer()


def byte_to_char():
    """GPT-2's byte -> printable unicode char table (what ByteLevel tokens are spelled in)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class PieceTokenizer:
    """A byte-level tokenizer whose vocab holds arbitrary byte pieces (may split characters)."""

    def __init__(self):
        self.b2c = byte_to_char()
        self.vocab = {"<|im_end|>": 0}
        self.pieces = [bytes([b]) for b in range(256)]
        self.hf = None

    def ids(self, pieces):
        """Register byte pieces (before `build`) and return their ids."""
        out = []
        for piece in pieces:
            spelled = "".join(self.b2c[b] for b in piece)
            out.append(self.vocab.setdefault(spelled, len(self.vocab)))
        return out

    def build(self):
        self.ids(self.pieces)
        tok = Tokenizer(models.BPE(vocab=self.vocab, merges=[]))
        tok.decoder = decoders.ByteLevel()
        self.hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
        return self.hf


def random_split(data: bytes, rng: random.Random, max_piece: int = 5):
    """Cut `data` at random byte positions (ignoring character boundaries)."""
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        pieces.append(data[i : i + n])
        i += n
    return pieces


def run(tokenizer, ids, prompt=(), flush=True, **params):
    """Feed ids one by one; return (deltas, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), SamplingParams(**params))
    deltas = [detok.step(t) for t in ids]
    if flush:
        deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("skip", [True, False])
def test_matches_full_decode_without_stops(demo_tok, skip):
    chat = [{"role": "user", "content": "hi"}]
    prompt = demo_tok.encode(
        demo_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    ids = demo_tok.encode("héllo €, world<|im_end|> 東京 and more text . !")
    deltas, detok = run(demo_tok, ids, prompt=prompt, skip_special_tokens=skip)
    expected = demo_tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == expected
    assert ("<|im_end|>" in expected) is not skip
    assert not detok.finished and detok.stop_reason is None


def test_random_ids_match_full_decode(demo_tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(demo_tok)) for _ in range(rng.randint(1, 30))]
        deltas, detok = run(demo_tok, ids)
        assert "".join(deltas) == detok.text == demo_tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_split_across_tokens_never_emit_replacement():
    pt = PieceTokenizer()
    rng = random.Random(1)
    data = UNICODE_TEXT.encode()
    splits = [pt.ids(random_split(data, rng)) for _ in range(30)]
    tok = pt.build()
    for ids in splits:
        assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # really splits characters
        deltas, detok = run(tok, ids, prompt=ids[:3], flush=False)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.text == UNICODE_TEXT


def test_flush_emits_incomplete_character_at_the_end():
    pt = PieceTokenizer()
    ids = pt.ids([b"ok ", "€".encode()[:2]])
    tok = pt.build()
    deltas, detok = run(tok, ids, flush=False)
    assert "".join(deltas) == "ok "
    assert detok.flush() == "\ufffd" and detok.text == tok.decode(ids)


def test_stop_string_spanning_two_tokens_is_excluded():
    pt = PieceTokenizer()
    ids = pt.ids([b"Hel", b"lo #", b"## after", b" more"])
    tok = pt.build()
    deltas, detok = run(tok, ids, stop=["never", "###"], flush=False)
    assert detok.finished and detok.stop_reason == "###"
    assert "".join(deltas) == detok.text == "Hello "
    assert detok.step(ids[0]) == "" and detok.flush() == ""  # finished: nothing more


def test_include_stop_str_in_output():
    pt = PieceTokenizer()
    ids = pt.ids([b"Hel", b"lo #", b"## after"])
    tok = pt.build()
    deltas, detok = run(tok, ids, stop="###", include_stop_str_in_output=True)
    assert "".join(deltas) == detok.text == "Hello ###"
    assert detok.stop_reason == "###"


def test_earliest_stop_wins():
    pt = PieceTokenizer()
    ids = pt.ids([b"a", b"bcdef"])
    tok = pt.build()
    _, detok = run(tok, ids, stop=["de", "bc"])
    assert detok.stop_reason == "bc" and detok.text == "a"


def test_partial_stop_is_withheld_then_released():
    pt = PieceTokenizer()
    ids = pt.ids([b"a #", b"# b", b" c #"])
    tok = pt.build()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop="###"))
    assert detok.step(ids[0]) == "a "  # "#" may start "###"
    assert detok.step(ids[1]) == "## b"  # "## b" cannot: released
    assert detok.step(ids[2]) == " c "
    assert detok.text == "a ## b c #"  # text includes the withheld tail
    assert detok.flush() == "#" and not detok.finished


def test_streaming_never_emits_what_a_stop_later_removes():
    pt = PieceTokenizer()
    rng = random.Random(2)
    data = UNICODE_TEXT.encode()
    splits = [pt.ids(random_split(data, rng, max_piece=4)) for _ in range(40)]
    tok = pt.build()
    for stop, include in [("###", False), ("東京 🎉", False), ("é —", True), ("ok ## #", False)]:
        end = UNICODE_TEXT.index(stop) + (len(stop) if include else 0)
        for ids in splits:
            detok = IncrementalDetokenizer(
                tok, [], SamplingParams(stop=[stop, "zz"], include_stop_str_in_output=include)
            )
            emitted = ""
            for token in ids:
                emitted += detok.step(token)
                # Nothing emitted is ever taken back: always a prefix of the final text.
                assert UNICODE_TEXT[:end].startswith(emitted)
                if detok.finished:
                    break
            assert detok.finished and detok.stop_reason == stop
            assert emitted == detok.text == UNICODE_TEXT[:end]


def test_skip_special_tokens_with_stop():
    pt = PieceTokenizer()
    ids = pt.ids([b"x", b"y"])
    tok = pt.build()
    ids = [ids[0], 0, ids[1]]
    assert "".join(run(tok, ids, stop="q")[0]) == "xy"
    assert "".join(run(tok, ids, stop="q", skip_special_tokens=False)[0]) == "x<|im_end|>y"
    _, detok = run(tok, ids, stop="<|im_end|>", skip_special_tokens=False)
    assert detok.stop_reason == "<|im_end|>" and detok.text == "x"


def test_decodes_only_a_small_window_per_step(demo_tok):
    calls = []

    class Spy:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return demo_tok.decode(ids, **kw)

    ids = demo_tok.encode("the quick brown fox é jumps " * 40)
    prompt = demo_tok.encode("a long prompt " * 50)
    deltas, detok = run(Spy(), ids, prompt=prompt, stop="zzz")
    assert "".join(deltas) == demo_tok.decode(ids)
    assert len(ids) > 200 and max(calls) <= 8


def test_fast_tokenizers_decode_through_the_rust_backend(demo_tok):
    """The per-step decode skips the transformers wrapper for a plain fast tokenizer (the
    tests above then check it against the wrapper's full decode); others keep `decode`."""
    detok = IncrementalDetokenizer(demo_tok, [], SamplingParams())
    assert detok._fast_decode is not None

    class Custom(type(demo_tok)):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs)

    custom = Custom(tokenizer_object=demo_tok.backend_tokenizer)
    assert IncrementalDetokenizer(custom, [], SamplingParams())._fast_decode is None
