"""How Whisper clips reach the engine (`polymodal.speech`, `WhisperProcessor.features`), on the
tiny checkpoint on the CPU:
- a one-window clip's features are made on the device it is given, and its window items are
  built without reading them back (a meta device: any read raises);
- a window's key is the clip's audio hash and the window's start: the same clip again hits,
  another clip or another window does not;
- clips loaded ahead are admitted together, not four a step (each admitting step runs eager);
- the bench profile's step log counts steps and admitted clips."""

import concurrent.futures

import numpy as np
import pytest
import torch

from polymodal import Pipeline
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.whisper_transcription import Transcription
from polymodal.speech import LOAD_AHEAD, _Requests
from tests.helpers import tiny_checkpoint

RATE = 16000


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(RATE * seconds)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    return Pipeline(str(path), dtype="float32", device="cpu", num_kv_blocks=256)


def test_features_on_a_device_are_never_read_back(pipe):
    proc = pipe.llm.processor
    params = SamplingParams(temperature=0.0)
    t = Transcription.load(proc, (noise(3.0, 0), RATE), params, torch.device("meta"),
                           language="en")  # fmt: skip
    assert t.features.device.type == "meta"
    item = t.requests()[0][1].mm_items[0]  # content_hash would read meta bytes: raises
    assert item.data["input_features"].device.type == "meta"
    host = Transcription.load(proc, (noise(3.0, 0), RATE), params, language="en")
    assert host.features.device.type == "cpu"
    assert host.requests()[0][1].mm_items[0].content_hash == item.content_hash


def test_window_keys_are_the_clip_and_the_window(pipe):
    proc = pipe.llm.processor
    params = SamplingParams(temperature=0.0)

    def key(t: Transcription) -> str:
        return t.requests()[0][1].mm_items[0].content_hash

    a, again = (Transcription.load(proc, (noise(3.0, 1), RATE), params, language="en")
                for _ in range(2))  # fmt: skip
    other = Transcription.load(proc, (noise(3.0, 2), RATE), params, language="en")
    assert key(a) == key(again) != key(other)
    long = Transcription.load(proc, (noise(12.0, 3), RATE), params, language="en")
    first = key(long)
    long.seek = 100  # as after a window's segments
    long._waiting = {}
    second = key(long)
    assert second != first and second.endswith("@100")


def test_loaded_clips_are_admitted_together(pipe):
    """Once the clips ahead are loaded, they all come out before the engine steps again."""
    params = SamplingParams(temperature=0.0, max_tokens=2)
    jobs = [(i, (noise(1.0, 10 + i), RATE), params, {"language": "en"}) for i in range(24)]
    requests = _Requests(pipe.llm, jobs, workers=2)
    try:
        next(requests)  # the first clip: waits for its load
        concurrent.futures.wait([load for _, load in requests.loading])
        ready = 0
        while True:
            try:
                next(requests)
            except StopIteration:
                break
            ready += 1
        assert ready >= LOAD_AHEAD - 1 >= 10, f"{ready} clips admitted at once"
    finally:
        requests.close()


def test_step_log_counts_admissions(pipe):
    from polymodal.bench.whisper_profile import step_log, step_summary

    runner = pipe.llm.engine.runner
    with step_log(runner) as log:
        out = pipe([{"audio": (noise(1.0, 40 + i), RATE), "language": "en"} for i in range(5)],
                   temperature=0.0, max_tokens=3, ignore_eos=True)  # fmt: skip
    assert "launch" not in vars(runner)  # the method is back
    # random weights may emit a timestamp pair: a clip's window then runs again from it
    windows = sum(r.usage.completion_tokens for r in out) // 3
    assert windows >= 5
    s = step_summary(log)  # each window request writes its encoder rows in one step
    assert s["admitting_steps"] * s["clips_per_admitting_step"] == pytest.approx(windows)
    assert s["graph_steps"] == 0 and s["steps"] >= 3  # no graphs on the CPU
