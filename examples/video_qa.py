"""Ask questions about a video (a synthetic clip is written when none is given).

    polymodal demo-model /tmp/tiny
    python examples/video_qa.py /tmp/tiny [clip.mp4] --question "What moves in this video?"

Videos are sampled at `--fps` (default 2) or to `--num-frames` frames; reading video files
needs `decord` (`pip install polymodal[video]`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from polymodal import Pipeline


def synthetic_clip(path: Path, frames: int = 24, size: int = 64) -> Path:
    """A small MP4 of a white square moving across a dark background (needs PyAV)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.full((size, size, 3), 20, np.uint8)
            x = t * (size - 16) // frames
            image[24:40, x : x + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("video", nargs="?")
    parser.add_argument("--question", action="append", help="repeat for several")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    video = args.video or str(synthetic_clip(Path(tempfile.mkdtemp()) / "moving_square.mp4"))
    questions = args.question or ["What happens in this video?", "What color is the square?"]
    pipe = Pipeline(args.model)
    options = {"fps": args.fps} if args.num_frames is None else {"num_frames": args.num_frames}
    # one batched call: every question about the same clip runs in one continuous batch
    results = pipe(
        [{"video": video, "text": q, **options} for q in questions],
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    for question, result in zip(questions, results):
        print(f"Q: {question}\nA: {result.error or result.text}")
        print(f"   ({result.usage.prompt_tokens} prompt tokens incl. video slots)\n")


if __name__ == "__main__":
    main()
