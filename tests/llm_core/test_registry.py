"""The registry: one row per architecture (model, processor, encoder, task), capability
interfaces instead of attribute probes, and a tiny fixture declared next to every model."""

import importlib
import inspect

import pytest

from polymodal.demo_model import tiny_configs
from polymodal.llm_core.interfaces import is_pooling_model, supports_multimodal
from polymodal.llm_core.registry import (
    MODELS,
    TASKS,
    ModelRow,
    encoder_class,
    model_class,
    model_modules,
    processor_class,
    register_model,
)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_row_is_consistent_with_the_model_interfaces(arch):
    row = MODELS[arch]
    assert isinstance(row, ModelRow) and row.task in TASKS
    cls = model_class(arch)
    assert supports_multimodal(cls) == (row.processor is not None) == (row.encoder is not None)
    if row.processor is not None:
        assert processor_class(arch) is not None and encoder_class(arch) is not None
    else:
        assert processor_class(arch) is None and encoder_class(arch) is None
    assert is_pooling_model(cls) == (row.task != "generate")


def test_every_architecture_has_a_tiny_fixture_next_to_its_model():
    declared = {tiny.architecture for tiny in tiny_configs().values()}
    assert set(MODELS) <= declared, sorted(set(MODELS) - declared)


@pytest.mark.parametrize("module", model_modules())
def test_model_files_import_no_encoder(module):
    """llm_core -> encoders would run against the dependency rule: towers come from the row."""
    source = inspect.getsource(importlib.import_module(module))
    assert "polymodal.encoders" not in source


def test_register_model_defaults_the_encoder_to_the_architecture(monkeypatch):
    monkeypatch.setitem(MODELS, "X", MODELS["LlamaForCausalLM"])
    register_model("XForConditionalGeneration", "m:M", "p:P")
    try:
        assert MODELS["XForConditionalGeneration"] == ModelRow(
            "m:M", "p:P", "XForConditionalGeneration"
        )
        with pytest.raises(ValueError, match="task must be one of"):
            register_model("Y", "m:M", task="sing")
    finally:
        MODELS.pop("XForConditionalGeneration", None)
