"""examples/custom_encoder.py runs end to end: a registered encoder + model serve a request."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_encoder.py"


def test_custom_encoder_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_encoder", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = example.main(str(tmp_path))
    assert example.PatchProjector.calls >= 1  # the engine really ran the plugged-in encoder
    assert isinstance(text, str) and text
    from polymodal.llm_core.registry import model_class

    assert model_class(example.ARCH).__name__ == "Qwen2VLForConditionalGeneration"
