"""Caption a folder (or bucket) of images across a Ray cluster: one engine per GPU / worker.

    polymodal demo-model /tmp/tiny
    python examples/ray_caption.py /tmp/tiny examples/ /tmp/captions_parquet --workers 2 --cpu

On a cluster: `ray start --head` on one machine, `ray start --address=HEAD:6379` on the
others, then run this script on the head with `--workers` = number of GPUs (each actor asks
for one GPU; `--tensor-parallel-size N`: N GPUs per actor, one engine split over them) and
input / output on shared storage (s3://, gs://, NFS).
"""

from __future__ import annotations

import argparse

import ray

from polymodal.ray_predictor import CaptionPredictor, actor_resources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("images", help="folder or URI that ray.data.read_images can list")
    parser.add_argument("out", help="output folder for Parquet files")
    parser.add_argument("--workers", type=int, default=1, help="engines (actors) in parallel")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per engine call")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="CPU actors (no GPU needed)")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs per engine (actor)"
    )
    args = parser.parse_args()

    ray.init()  # joins a running cluster when there is one, else starts a local one
    ds = ray.data.read_images(args.images, include_paths=True, mode="RGB")
    resources = actor_resources(args.workers, not args.cpu, args.tensor_parallel_size)
    captions = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={
            "model": args.model,
            "max_tokens": args.max_tokens,
            "prompt": "Write a one-sentence caption for this image.",
            **({} if args.cpu else {"tensor_parallel_size": args.tensor_parallel_size}),
        },
        concurrency=args.workers,
        batch_size=args.batch_size,
        **resources,
    )
    captions.drop_columns(["image"]).write_parquet(args.out)
    print(f"wrote captions to {args.out}")


if __name__ == "__main__":
    main()
