"""Caption every image / video in a folder into a resumable JSONL file.

    polymodal demo-model /tmp/tiny                # or use a real model id
    python examples/caption_folder.py /tmp/tiny examples/ captions.jsonl

Rerunning skips what is already in the output; killing it loses nothing. The same job from
the command line: `polymodal caption examples/ --model /tmp/tiny --out captions.jsonl`.
"""

from __future__ import annotations

import argparse

from polymodal import LLM, SamplingParams
from polymodal.caption import caption_files
from polymodal.caption_io import discover_inputs, read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("folder")
    parser.add_argument("out", help=".jsonl or .parquet")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    llm = LLM(args.model)
    paths = discover_inputs([args.folder])
    counts = caption_files(
        llm,
        paths,
        args.out,
        prompt="Write a one-sentence caption for this {kind}.",
        params=SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
        batch_size=16,
    )
    print(counts)
    for record in read_records(args.out)[:5]:
        print(record["key"], "->", record["error"] or record["caption"])


if __name__ == "__main__":
    main()
