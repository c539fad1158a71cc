"""Shared setup of the Triton kernel tests that run on CPU under TRITON_INTERPRET=1.

Triton decides interpret vs compile when it is imported, so `tests/conftest.py` imports this
module before any test module: it sets the flag before any import of triton. Where that cannot
hold in this process (a CUDA machine,
whose GPU tests need compiled kernels, or triton already imported), the test modules' tests skip
and `test_interpreted_in_subprocess` (imported into each) reruns the module in a fresh
interpreter-mode process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._device import _device_constructors

IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or (
    "triton" not in sys.modules and not torch.cuda.is_available()
)
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # interp. bf16 truncates


def assert_close(out, ref, dtype):
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.fixture(autouse=True)
def _interpreted_only(request, monkeypatch):
    """Skip in-process tests where triton compiles; poison every fresh allocation with NaN."""
    if not IN_PROCESS and request.node.name != "test_interpreted_in_subprocess":
        pytest.skip("kernels are compiled in this process; see test_interpreted_in_subprocess")
    # torch's device contexts (`with torch.device(...)`) cache the constructors they redirect on
    # first use: filled while `torch.empty` is patched below, the cache would hold the patch,
    # and `with torch.device("meta")` would build on the CPU for the rest of the process
    _device_constructors()
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def test_interpreted_in_subprocess(request):
    """Rerun the test module with TRITON_INTERPRET=1 and no GPU when it cannot run in process."""
    if IN_PROCESS:
        pytest.skip("ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(request.path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
