"""A hub id at a `revision` (vLLM's `LLM(model, revision=...)`, `--revision`) and with an
`hf_token`: resolved through huggingface_hub's cache offline (a cache laid out as the hub
client writes it: refs/<branch> naming a snapshot folder), a revision the cache lacks named in
the error, a revision with a local folder refused, and the token handed to the hub client."""

import shutil
from pathlib import Path

import pytest

from polymodal import LLM, InvalidInputError
from polymodal.llm_core import loader
from polymodal.llm_core.errors import ModelNotFoundError
from tests.helpers import tiny_checkpoint

REPO = "polymodal-test/tiny"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}


@pytest.fixture
def hub_cache(tmp_path_factory, tmp_path, monkeypatch):
    """A hub cache holding two revisions of REPO: main a Qwen2 checkpoint, v2 a Llama one."""
    from huggingface_hub import constants

    repo = tmp_path / "models--polymodal-test--tiny"
    for ref, arch in (("main", "qwen2"), ("v2", "llama")):
        shutil.copytree(tiny_checkpoint(tmp_path_factory, arch), repo / "snapshots" / COMMITS[ref])
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(COMMITS[ref])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_revision_picks_the_snapshot(hub_cache):
    assert loader.resolve_model_path(REPO) == hub_cache / "snapshots" / COMMITS["main"]
    assert loader.resolve_model_path(REPO, "v2") == hub_cache / "snapshots" / COMMITS["v2"]
    llm = LLM(REPO, revision="v2", device="cpu", dtype="float32", num_kv_blocks=16)
    assert llm.model_config.architecture == "LlamaForCausalLM"
    assert LLM(REPO, device="cpu", num_kv_blocks=16).model_config.architecture == (
        "Qwen2ForCausalLM"
    )


def test_missing_revision_and_local_folder_with_revision_are_named(hub_cache, tmp_path_factory):
    with pytest.raises(ModelNotFoundError, match="at revision 'v9'"):
        loader.resolve_model_path(REPO, "v9")
    local = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    with pytest.raises(InvalidInputError, match="revision='v2' picks a hub revision"):
        LLM(local, revision="v2", device="cpu")


def test_token_and_revision_reach_the_hub_client(monkeypatch, tmp_path):
    """`hf_token` and `revision` from the CLI's engine options reach `snapshot_download`."""
    import argparse

    import huggingface_hub

    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    argv = ["--revision", "v2", "--hf-token", "hf_x", "--download-dir", "/hub"]
    kwargs = engine_kwargs(parser.parse_args(argv))
    assert kwargs["revision"] == "v2" and kwargs["hf_token"] == "hf_x"
    assert "cuda_graphs" not in kwargs
    assert engine_kwargs(parser.parse_args(["--enforce-eager"]))["cuda_graphs"] is False
    seen = {}

    def fake(repo_id, revision=None, token=None, cache_dir=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    path = loader.resolve_model_path(
        REPO, kwargs["revision"], kwargs["hf_token"], kwargs["download_dir"]
    )
    assert path == Path(tmp_path)
    assert seen == {"repo_id": REPO, "revision": "v2", "token": "hf_x", "cache_dir": "/hub"}
