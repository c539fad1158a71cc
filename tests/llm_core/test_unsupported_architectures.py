"""An architecture the registry does not serve gets UnsupportedModelError naming it and the
supported list, whatever its config.json holds: checked before any decoder field is read."""

import json

import pytest

from polymodal import UnsupportedModelError
from polymodal.llm_core.config import load_config
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.registry import MODELS


def _transformers_architectures() -> dict[str, str]:
    """Every model class name in transformers' auto mappings -> its model_type."""
    from transformers.models.auto import modeling_auto

    archs: dict[str, str] = {}
    for name in dir(modeling_auto):
        mapping = getattr(modeling_auto, name)
        if not name.endswith("_MAPPING_NAMES") or not isinstance(mapping, dict):
            continue
        for model_type, classes in mapping.items():
            for cls in classes if isinstance(classes, (list, tuple)) else [classes]:
                archs.setdefault(cls, model_type)
    return archs


def test_every_unserved_transformers_architecture_is_named(tmp_path):
    archs = _transformers_architectures()
    assert len(archs) > 500, "transformers' auto mappings moved: the test lost its inputs"
    unserved = {a: t for a, t in archs.items() if a not in MODELS}
    assert unserved and len(unserved) < len(archs)
    config = tmp_path / "config.json"
    failures = []
    for arch, model_type in sorted(unserved.items()):
        config.write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
        try:
            load_config(tmp_path)
        except UnsupportedModelError as exc:
            if repr(arch) not in str(exc) or "LlamaForCausalLM" not in str(exc):
                failures.append((arch, str(exc)))
        except Exception as exc:  # noqa: BLE001 (any other exception is the failure)
            failures.append((arch, f"{type(exc).__name__}: {exc}"))
        else:
            failures.append((arch, "no error"))
    assert not failures, failures[:10]


@pytest.mark.parametrize("arch", ["T5ForConditionalGeneration", "BertForMaskedLM"])
def test_full_config_of_an_unserved_model_through_the_engine(tmp_path, arch):
    """A real config (no decoder fields such as `intermediate_size` for T5) and no weights:
    the engine names the architecture instead of failing on a missing field."""
    import transformers as tf

    cfg = tf.T5Config() if arch.startswith("T5") else tf.BertConfig()
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=rf"'{arch}' is not supported; supported: \["):
        Engine(str(tmp_path), device="cpu")
