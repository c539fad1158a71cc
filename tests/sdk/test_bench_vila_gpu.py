"""`polymodal bench` for NVILA on CUDA, briefly, on a tiny checkpoint (bf16, CUDA graphs, the
reference batched on the device): both sides run captioning and the video request, every
image decodes the tokens asked for, the prompts have one length on both sides. Timings are
not checked."""

import json

import pytest
import torch

from polymodal.cli import main
from tests.helpers import tiny_checkpoint
from tests.sdk.test_bench_speech import check_side
from tests.sdk.test_bench_vila import TOKENS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bench_runs_on_cuda(tmp_path_factory, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path_factory, "nvila")
    out = tmp_path / "bench.json"
    argv = ["bench", str(path), "--dummy-weights", "--images", "8", "--hf-images", "4",
            "--hf-batch", "2", "--output-tokens", str(TOKENS), "--video-frames", "8",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cuda" and r["dtype"] == "bfloat16"
    check_side(r["ours"]["captioning"], 8)
    check_side(r["hf"]["captioning"], 4)
    assert r["video_tokens"] == 4 * 4  # 8 frames averaged in pairs, 4 tokens each
    assert r["ours"]["video"]["prompt_tokens"] == r["hf"]["video"]["prompt_tokens"]
    assert "speedup: TTFT" in capsys.readouterr().out
