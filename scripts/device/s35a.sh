#!/usr/bin/env bash
# Issue 19: FP8 captioning's decode GEMMs (32 rows) run cuBLAS's 128x128 FP8 tile (28-36 CTAs
# for the 3584/4608-wide linears): the W8A8 forms at decode-batch rows vs bf16; the decoder
# GEMMs at one prompt's rows (Gemma 3, issue 18).
source scripts/device/setup.sh
timeout 300 python3 scripts/bench_quant_kernels.py --only fp8_rows --rows 2,16,32,64 2>&1 | tail -20
