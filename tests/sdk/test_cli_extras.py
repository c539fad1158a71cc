"""Every CLI command runs with only its own extra installed: the others are hidden here (an
import hook makes them look absent), as on a machine where `pip install polymodal` alone ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ALL_EXTRAS = ("fastapi", "uvicorn", "prometheus_client", "gradio", "ray", "pyarrow")

# Runs `polymodal.cli.main(argv)` with `hidden` top-level modules made unimportable.
RUNNER = """
import sys
hidden = set(sys.argv[1].split(","))

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from polymodal.cli import main
sys.exit(main(sys.argv[2:]))
"""


def polymodal(*argv, hidden=ALL_EXTRAS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUNNER, ",".join(hidden), *map(str, argv)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)


COMMANDS = ["demo-model", "generate", "serve", "run-batch", "demo", "caption", "transcribe",
            "bench"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_without_extras(command):
    run = polymodal(command, "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: polymodal" in run.stdout


@pytest.mark.parametrize(
    "command, extra, module",
    [("serve", "serve", "fastapi"), ("run-batch", "serve", "fastapi"), ("demo", "demo", "gradio")],
)
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path, command, extra, module):
    files = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model"]
    run = polymodal(command, *(files if command == "run-batch" else ()), tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert module in lines[0] and f"pip install 'polymodal[{extra}]'" in lines[0]


def test_caption_runs_with_no_extra_and_checks_before_loading(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    media = tmp_path / "media"
    media.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 90, 20, 200)).save(media / f"{i}.png")
    out = tmp_path / "captions.jsonl"
    common = ["--max-tokens", "3", "--num-kv-blocks", "64", "--no-progress"]
    run = polymodal("caption", media, "--model", ckpt, "--out", out, *common)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 2
    # Parquet without pyarrow, and inputs that match nothing: refused before any model loads
    # (the model named here does not exist)
    missing_model = tmp_path / "no-such-model"
    parquet = polymodal("caption", media, "--model", missing_model, "--out", tmp_path / "o.parquet")
    assert parquet.returncode == 2 and "Traceback" not in parquet.stderr
    assert "pip install 'polymodal[batch]'" in parquet.stderr
    empty = polymodal("caption", f"{tmp_path}/*.jpg", "--model", missing_model, "--out", out)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert "no image or video files matched" in empty.stderr


def test_generate_runs_with_no_extra(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    run = polymodal(
        "generate", ckpt, "--image", "examples/sample.png", "--max-tokens", "3", "--text", "Hi"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "completion tokens" in run.stdout
