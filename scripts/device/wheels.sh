#!/usr/bin/env bash
# Wheels the H200 device image lacks (its Python 3.12 has torch, transformers, triton, numpy,
# pillow, safetensors, tokenizers, starlette's deps...; /work/.library/device/KINDS.md lists it),
# downloaded here into .whl/ for `run(..., carry=[".whl", ...])`. Pinned to versions seen working
# there: a newer fastapi needs opentelemetry-api (which transformers then tries to use), and a
# carried soundfile makes transformers import cffi, which the image lacks (both broke runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 blake3==1.0.11 fastapi==0.135.0 starlette==1.10.0 \
  uvicorn==0.55.0 httptools==0.9.0 python-multipart==0.0.34 xgrammar==0.2.9 \
  apache-tvm-ffi==0.1.15.post2 py-spy==0.4.3
du -sh .whl  # py-spy: a sampling profiler for the server's host side (burst_profile.py spy)
