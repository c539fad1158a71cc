"""Chat with `polymodal serve` through the official `openai` client: text, an image, streaming.

    polymodal demo-model /tmp/tiny
    polymodal serve /tmp/tiny --port 8000 &
    python examples/openai_chat.py --base-url http://127.0.0.1:8000/v1 [--image examples/sample.png]

Images travel inline as `data:` URLs; a server started with `--allowed-media-dir DIR` also
accepts local paths under DIR, and `--allow-http` http(s) URLs.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path

from openai import OpenAI


def data_url(path: Path) -> str:
    """The file as a base64 `data:` URL."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if any")
    parser.add_argument("--image", default=str(Path(__file__).with_name("sample.png")))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id

    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in one sentence."}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print("text:", reply.choices[0].message.content, f"[{reply.usage.total_tokens} tokens]")

    image_message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(Path(args.image))}},
            {"type": "text", "text": "Describe this image."},
        ],
    }
    print("image (streamed): ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[image_message],
        max_tokens=args.max_tokens,
        temperature=0.7,
        top_p=0.9,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens}]")


if __name__ == "__main__":
    main()
