"""The processed-input cache in the flows of their own: VILA / NVILA (images and video files),
Phi-4-multimodal (images) and audio decoding (`load_audio`: Phi-4-MM's and Whisper's clips).
The same bytes as bytes, a path or a data: URL are processed once and give the same item; other
options miss; a hit is a copy whose own fields are independent of the cached entry."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from polymodal.processors import audio as audio_module
from polymodal.processors import phi4mm, vila
from polymodal.processors.audio import load_audio
from polymodal.processors.input_cache import ProcessedInputCache
from tests.helpers import tiny_checkpoint
from tests.processors.audio_signals import encode, tone


def _jpeg(image, size=(200, 120)) -> bytes:
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _forms(data: bytes, path, mime: str) -> list:
    """The same bytes as bytes, a Path, a str path and a data: URL."""
    path.write_bytes(data)
    return [data, path, str(path), f"data:{mime};base64," + base64.b64encode(data).decode()]


def _counting(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _same(a, b) -> None:
    assert a.content_hash == b.content_hash and a.data.keys() == b.data.keys()
    for name in a.data:
        assert torch.equal(a.data[name], b.data[name])
    assert (a.slot_start, a.num_slots) == (b.slot_start, b.num_slots)


@pytest.fixture()
def nvila(tmp_path_factory):
    return vila.VilaProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "nvila"))


def test_vila_images_hit_from_every_form_of_their_bytes(nvila, photos, tmp_path, monkeypatch):
    decodes = _counting(monkeypatch, vila, "load_image")
    data = _jpeg(photos["astronaut"])
    first = nvila.process(prompt="<image> What is it?", images=[data])
    for source in _forms(data, tmp_path / "a.jpg", "image/jpeg"):
        again = nvila.process(prompt="<image> What is it?", images=[source])
        assert again.token_ids == first.token_ids
        _same(again.mm_items[0], first.mm_items[0])
    assert decodes == [1] and nvila.input_cache.hits == 4
    # two images are one square view each, not tiles: another entry
    pair = nvila.process(prompt="<image><image> Compare.", images=[data, data])
    assert decodes == [1, 1] and pair.mm_items[0].content_hash != first.mm_items[0].content_hash
    assert pair.mm_items[1].content_hash == pair.mm_items[0].content_hash
    # a hit is a copy: re-slotting or staging it leaves the cached entry alone
    hit = nvila.process(prompt="Longer text first. <image>", images=[data]).mm_items[0]
    assert hit.slot_start != first.mm_items[0].slot_start
    hit.data["pixel_frames"] = None
    _same(nvila.process(prompt="<image> What is it?", images=[data]).mm_items[0], first.mm_items[0])


def test_vila_video_files_hit_with_the_same_sampling(nvila, video_file, monkeypatch):
    decodes = _counting(monkeypatch, vila, "load_video")
    prompt = "<vila/video> What happens?"
    first = nvila.process(prompt=prompt, videos=[video_file])
    again = nvila.process(prompt=prompt, videos=[video_file], num_frames=4)  # the default
    assert again.token_ids == first.token_ids
    _same(again.mm_items[0], first.mm_items[0])
    assert decodes == [1]
    other = nvila.process(prompt=prompt, videos=[video_file], num_frames=6)
    assert decodes == [1, 1] and other.mm_items[0].content_hash != first.mm_items[0].content_hash
    frames = [np.zeros((32, 32, 3), np.uint8)] * 4  # decoded frames: not cached
    nvila.process(prompt=prompt, videos=[frames])
    nvila.process(prompt=prompt, videos=[frames])
    assert len(nvila.input_cache) == 2


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "phi4mm")
    return lambda **kwargs: phi4mm.Phi4MMProcessor.from_pretrained(path, **kwargs)


def test_phi4mm_images_hit_and_options_miss(phi, photos, tmp_path, monkeypatch):
    proc = phi()
    decodes = _counting(monkeypatch, phi4mm, "load_image")
    data = _jpeg(photos["coffee"])
    text = "<|user|><|image_1|>What is it?<|end|><|assistant|>"
    first = proc.process(prompt=text, images=[data])
    for source in _forms(data, tmp_path / "c.jpg", "image/jpeg"):
        again = proc.process(prompt=text, images=[source])
        assert again.token_ids == first.token_ids
        _same(again.mm_items[0], first.mm_items[0])
    assert decodes == [1]
    fewer = proc.process(prompt=text, images=[data], dynamic_hd=1)  # another crop limit: miss
    assert decodes == [1, 1] and fewer.mm_items[0].num_slots < first.mm_items[0].num_slots
    hit = proc.process(prompt=text, images=[data]).mm_items[0]
    hit.data["pixel_values"] = None
    _same(proc.process(prompt=text, images=[data]).mm_items[0], first.mm_items[0])
    off = phi(processed_cache_mb=0)
    assert off.input_cache is None
    off.process(prompt=text, images=[data])
    off.process(prompt=text, images=[data])
    assert decodes == [1, 1, 1, 1]


def test_phi4mm_audio_next_to_an_image_leaves_the_cached_clip_alone(phi, photos, monkeypatch):
    """The clip is decoded once; marking it for the vision-speech projector (an image in the
    same prompt) changes that request's item, not the next one's."""
    proc = phi()
    decodes = _counting(monkeypatch, audio_module, "decode_audio")
    clip = encode(tone(440.0, 1.0, 22_050), 22_050, "wav")
    alone = proc.process(prompt="<|user|><|audio_1|>Say it.<|end|>", audios=[clip])
    image = _jpeg(photos["coffee"])
    both = proc.process(prompt="<|user|><|image_1|><|audio_1|><|end|>", images=[image],
                        audios=[clip])  # fmt: skip
    again = proc.process(prompt="<|user|><|audio_1|>Say it.<|end|>", audios=[clip])
    assert decodes == [1]
    speech = [it for it in both.mm_items if it.modality == "audio"][0]
    assert speech.content_hash == alone.mm_items[0].content_hash + ":vision_speech"
    assert "vision_speech" not in again.mm_items[0].data
    _same(again.mm_items[0], alone.mm_items[0])


def test_load_audio_hits_by_bytes_and_rate(tmp_path, monkeypatch):
    decodes = _counting(monkeypatch, audio_module, "decode_audio")
    cache = ProcessedInputCache(16)
    data = encode(tone(300.0, 0.5, 44_100), 44_100, "flac")
    first = load_audio(data, cache=cache)
    for source in _forms(data, tmp_path / "t.flac", "audio/flac"):
        again = load_audio(source, cache=cache)
        assert torch.equal(again.waveform, first.waveform) and again is not first
        assert (again.sampling_rate, again.source_rate) == (16_000, 44_100)
    assert decodes == [1] and cache.hits == 4
    assert load_audio(data, sampling_rate=8_000, cache=cache).num_samples == 4_000  # rate: miss
    load_audio(data, max_seconds=10.0, cache=cache)  # another limit: checked again, a miss
    assert decodes == [1, 1, 1]
    hit = load_audio(data, cache=cache)
    hit.waveform = hit.waveform[:10]  # a copy's fields are its own
    assert load_audio(data, cache=cache).num_samples == first.num_samples
    pair = (tone(300.0, 0.5, 16_000), 16_000)  # samples given: nothing to key, not cached
    load_audio(pair, cache=cache)
    assert len(cache) == 3


def test_whisper_decodes_a_repeated_clip_once(tmp_path_factory, monkeypatch):
    from polymodal.processors.whisper import WhisperProcessor

    proc = WhisperProcessor.from_pretrained(tiny_checkpoint(tmp_path_factory, "whisper"))
    decodes = _counting(monkeypatch, audio_module, "decode_audio")
    clip = encode(tone(440.0, 1.0, 16_000), 16_000, "wav")
    first, again = proc.audio_item(clip), proc.audio_item(clip)
    assert decodes == [1]
    _same(again, first)
