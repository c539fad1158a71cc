"""`polymodal.bench.timing.graph_ms`: the kernel benches' CUDA-graph timing waits for the work
queued before it (`do_bench_cudagraph` runs on a stream of its own), and no bench times
another way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import triton.testing

from polymodal.bench.timing import graph_ms

ROOT = Path(__file__).resolve().parents[2]


def test_graph_ms_synchronizes_before_timing(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))

    def bench(fn, rep, return_mode):
        calls.append(("bench", rep, return_mode))
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", bench)
    assert graph_ms(lambda: None, rep=7) == 1.5
    assert calls == ["synchronize", ("bench", 7, "median")]


def test_benches_time_through_graph_ms():
    """A direct `do_bench_cudagraph` call would race its inputs again."""
    direct = [
        str(path.relative_to(ROOT))
        for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("sdk/bench/*.py")]
        if path.name != "timing.py" and re.search(r"do_bench_cudagraph\(", path.read_text())
    ]
    assert direct == []


@pytest.mark.gpu
def test_graph_ms_sees_inputs_queued_before_it():
    """The default stream sleeps, then writes the input; `fn` keeps the smallest value it ever
    read. Without the synchronize its first call runs on do_bench_cudagraph's stream during
    the sleep and reads the stale 0."""
    value = torch.zeros(1, dtype=torch.int32, device="cuda")
    seen = torch.full((1,), 1 << 20, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of the default stream
    value.fill_(1)
    graph_ms(lambda: torch.minimum(seen, value, out=seen), rep=5)
    assert seen.item() == 1
