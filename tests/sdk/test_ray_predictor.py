"""CaptionPredictor on a local Ray cluster (2 CPU workers): one output row per input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_checkpoint

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[data]')")

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("ray.data")


def test_predictor_in_process(tmp_path_factory, tmp_path):
    from polymodal.ray_predictor import CaptionPredictor

    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.png")
    predictor = CaptionPredictor(str(ckpt), max_tokens=3, num_kv_blocks=64)
    batch = {
        "image": np.array([np.full((24, 32, 3), 200, np.uint8), None], dtype=object),
        "path": np.array(["", str(tmp_path / "a.png")], dtype=object),
    }
    out = predictor(batch)
    assert list(out["error"]) == [None, None] and all(out["caption"])
    bad = predictor({"path": np.array([str(tmp_path / "missing.png")], dtype=object)})
    assert "no such file" in bad["error"][0] and bad["caption"][0] == ""


def test_ray_data_two_workers_one_row_per_input(tmp_path_factory, tmp_path):
    from polymodal.ray_predictor import CaptionPredictor

    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    paths = []
    for i in range(9):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (32 + i, 32), (i * 20, 50, 90)).save(path)
        paths.append(str(path))
    (tmp_path / "corrupt.png").write_bytes(b"nope")
    paths.append(str(tmp_path / "corrupt.png"))
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(
            CaptionPredictor,
            fn_constructor_kwargs={"model": str(ckpt), "max_tokens": 4, "num_kv_blocks": 64},
            concurrency=2,
            batch_size=3,
            num_cpus=1,
        )
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert sorted(r["path"] for r in rows) == sorted(paths)
    by_path = {r["path"]: r for r in rows}
    assert "image 1" in by_path[paths[-1]]["error"]
    assert all(by_path[p]["caption"] and by_path[p]["error"] is None for p in paths[:-1])


def test_documented_example_command_finishes_on_this_machine(tmp_path_factory, tmp_path):
    """`examples/ray_caption.py MODEL examples/ OUT --workers 2 --cpu`, as docs/batch.md says
    to run it: the actors leave Ray Data's read task a CPU, so it ends (it hung on 2 cores)."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    out = tmp_path / "captions"
    cmd = [sys.executable, "examples/ray_caption.py", str(ckpt), "examples/", str(out)]
    cmd += ["--workers", "2", "--cpu", "--max-tokens", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert rows and all(r["caption"] and r["error"] is None for r in rows)


def test_actor_resources_per_gpu_group():
    """An engine split over N GPUs asks Ray for N GPUs per actor."""
    from polymodal.ray_predictor import actor_resources

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert actor_resources(2, True, gpus_per_worker=4)["num_gpus"] == 4
        assert actor_resources(2, True)["num_gpus"] == 1
        assert "num_gpus" not in actor_resources(2, False)
        with pytest.raises(ValueError, match="gpus_per_worker"):
            actor_resources(1, True, gpus_per_worker=0)
    finally:
        ray.shutdown()
