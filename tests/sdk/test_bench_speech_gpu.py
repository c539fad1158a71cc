"""`polymodal bench` for Whisper and Phi-4-multimodal on CUDA, briefly, on tiny checkpoints
(bf16, CUDA graphs, the LoRA kernels): both sides run, every request decodes the tokens asked
for, the numbers are sane. Timings are not checked."""

import pytest
import torch

from tests.helpers import tiny_checkpoint
from tests.sdk.test_bench_speech import TOKENS, check_side, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("arch", ["whisper", "phi4mm"])
def test_bench_runs_on_cuda(arch, tmp_path_factory, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path_factory, arch)
    r = run_cli(path, tmp_path, "--device", "cuda", "--clips", "8", "--hf-clips", "4",
                "--hf-batch", "2")  # fmt: skip
    assert r["device"] == "cuda" and r["dtype"] == "bfloat16" and r["output_tokens"] == TOKENS
    if arch == "whisper":
        sides = [(r["ours"], r["hf"])]
    else:  # every workload: audio, image, mixed
        assert list(r["ours"]) == list(r["hf"]) == ["audio", "image", "mixed"]
        sides = [(r["ours"][k], r["hf"][k]) for k in r["ours"]]
    for ours, hf in sides:
        check_side(ours, 8)
        check_side(hf, 4)
    assert "speedup" in capsys.readouterr().out
