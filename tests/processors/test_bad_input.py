"""User mistakes raise `MediaError` / `InvalidInputError` naming the item, never a PIL traceback."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.processors import load_image, load_video

MARK = "<|vision_start|><|image_pad|><|vision_end|>"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width x height` RGB, followed by a token 100-byte IDAT chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)  # far fewer pixels than claimed: nothing is allocated
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)


def _jpeg_bytes(photos) -> bytes:
    buffer = io.BytesIO()
    photos["chelsea"].save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_image_files_name_the_item(tmp_path, photos, our_processors):
    ours = our_processors["qwen2_vl"]
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_jpeg_bytes(photos)[:2000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(30000, 30000))
    cases = [
        (truncated, "cut.jpg", "cannot decode"),
        (empty, "empty.png", "empty"),
        (text, "notes.png", "cannot decode"),
        (huge, "huge.png", "900000000 pixels exceeds the limit"),
        (tmp_path / "missing.png", "missing.png", "no such file"),
    ]
    good = photos["tiny"]
    for path, name, reason in cases:
        # the bad file is the second image, so the message must say "image 2"
        with pytest.raises(MediaError, match=rf"image 2 \('{name}'\): .*{reason}"):
            ours.process(prompt=f"{MARK}{MARK}", images=[good, str(path)])


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    start = time.perf_counter()
    with pytest.raises(MediaError, match="900000000 pixels exceeds the limit of 100000000"):
        load_image(_png_header(30000, 30000))  # PIL's own bomb check refuses this one
    with pytest.raises(MediaError, match="12000x12000 = 144000000 pixels exceeds the limit"):
        load_image(_png_header(12000, 12000))  # below PIL's limit: ours catches it
    assert time.perf_counter() - start < 0.5  # nothing was allocated or decoded
    small = io.BytesIO()
    Image.new("RGB", (64, 64)).save(small, format="PNG")
    with pytest.raises(MediaError, match="64x64 = 4096 pixels exceeds the limit of 1000"):
        load_image(small.getvalue(), max_pixels=1000)  # the limit is configurable


def test_other_bad_images():
    with pytest.raises(MediaError, match="image 1 .*allow_http=True"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(MediaError, match="image 1 .*cannot fetch the URL.*refused"):
        load_image("http://127.0.0.1:9/cat.jpg", allow_http=True)  # nothing listens on port 9
    with pytest.raises(MediaError, match="unsupported image type int"):
        load_image(42)
    with pytest.raises(MediaError, match="uint8"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(MediaError, match="1, 3 or 4 channels"):
        load_image(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(MediaError, match="malformed data: URL"):
        load_image("data:image/png;base64")
    for empty in (
        np.zeros((0, 8, 3), np.uint8),
        Image.new("RGB", (0, 5)),
        torch.zeros(3, 8, 0, dtype=torch.uint8),
    ):
        with pytest.raises(MediaError, match=r"image 1 .*the image is empty"):
            load_image(empty)  # was a ZeroDivisionError in the resize plan
    assert isinstance(MediaError("x"), InvalidInputError)


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3_vl"])
def test_a_closed_pil_image_names_the_item(arch, our_processors, tmp_path_factory):
    """A PIL image closed before the call: a MediaError naming it (its processed-input key and
    its loading both read it; the key gives up, the loader names the item), in Qwen-VL's
    processor and in the shared MediaProcessor flow."""
    from polymodal.processors.gemma3 import Gemma3Processor
    from tests.helpers import tiny_checkpoint

    if arch == "qwen2_vl":
        proc, mark = our_processors[arch], MARK
    else:
        proc = Gemma3Processor.from_pretrained(tiny_checkpoint(tmp_path_factory, arch))
        mark = proc.placeholder
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40)).save(buffer, format="PNG")
    closed = Image.open(io.BytesIO(buffer.getvalue()))
    closed.load()
    closed.close()
    with pytest.raises(MediaError, match=r"image 1 \(<PIL image RGB 50x40>\): .*closed image"):
        proc.process(prompt=mark, images=[closed])


def test_extreme_aspect_ratio_names_the_item(our_processors):
    with pytest.raises(MediaError, match=r"image 1 .*aspect ratio must be at most 200"):
        our_processors["qwen2_vl"].process(prompt=MARK, images=[Image.new("RGB", (3000, 10))])


def test_placeholder_count_mismatch(photos, our_processors):
    ours = our_processors["qwen2_vl"]
    images = [photos["tiny"]] * 3
    with pytest.raises(MediaError, match=r"3 images given but the prompt has 2 image placeholders"):
        ours.process(prompt=f"{MARK}{MARK}", images=images)
    with pytest.raises(MediaError, match=r"1 image given but the prompt has 2 image placeholders"):
        ours.process(prompt=f"{MARK}{MARK}", images=images[:1])
    with pytest.raises(MediaError, match=r"1 video given but the prompt has 0 video placeholders"):
        ours.process(prompt="no markers", videos=[[photos["tiny"]] * 2])
    with pytest.raises(InvalidInputError, match="exactly one of"):
        ours.process()
    refused = "item 1 is audio: QwenVLProcessor takes image and video input only"
    with pytest.raises(InvalidInputError, match=refused):
        ours.process(messages=[{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])


def test_bad_videos_name_the_item(tmp_path, video_file, our_processors):
    import av

    ours = our_processors["qwen2_5_vl"]
    vmark = "<|vision_start|><|video_pad|><|vision_end|>"
    # a valid MP4 container holding a video stream with no frames at all
    no_frames = tmp_path / "noframes.mp4"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = 64, 64
        container.start_encoding()  # writes the header; no frame is ever encoded
    assert no_frames.stat().st_size > 0
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a video" * 100)
    for path, name in [(no_frames, "noframes.mp4"), (garbage, "garbage.mp4")]:
        with pytest.raises(MediaError, match=rf"video 2 \('{name}'\): cannot decode video"):
            ours.process(prompt=vmark * 2, videos=[video_file, str(path)], num_frames=4)
    with pytest.raises(
        MediaError, match=r"video 1 .*asked for 40 frames but the video has only 36"
    ):
        load_video(video_file, num_frames=40)
    with pytest.raises(MediaError, match="one shape"):
        load_video([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    with pytest.raises(MediaError, match="non-empty list of frames"):
        load_video([])
    with pytest.raises(MediaError, match=r"video 1 .*the frames are empty \(8x0\)"):
        load_video(np.zeros((4, 0, 8, 3), np.uint8))  # was a ZeroDivisionError
