"""`polymodal bench` end to end on a tiny Qwen2.5-VL checkpoint (CUDA): every workload, the
profile tables and the transformers side run and report sane numbers. Timings are not checked."""

import argparse
import json

import pytest

from polymodal.bench import bench_command
from polymodal.bench.engine import print_table, run_bench
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bench_runs_every_workload(tmp_path_factory, async_scheduling, capsys):
    parser = argparse.ArgumentParser()
    bench_command(parser)
    argv = [str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")), "--dummy-weights", "--profile"]
    argv += ["--images", "8", "--hf-images", "4", "--hf-batch", "2"]
    argv += ["--output-tokens", "4", "--decode-tokens", "8"]
    args = parser.parse_args(
        argv + (["--async-scheduling"] if async_scheduling else ["--no-async-scheduling"])
    )
    r = run_bench(args)
    print_table(r)
    ours, hf = r["ours"], r["hf"]
    assert ours["images_s"] > 0 and hf["images_s"] > 0
    assert ours["output_tokens_s"] == pytest.approx(ours["images_s"] * 4)
    assert 0 < ours["decode_fraction_of_floor"] and ours["ttft_ms"] > 0
    assert ours["decode_gpu_idle_share"] < 1
    prof = r["profile"]
    assert prof["ttft_kernels"]["gpu_busy_ms"] > 0
    assert prof["ttft_kernels"]["decoder gpu_span_ms"] > 0
    assert prof["ttft_kernels"]["vision encoder gpu_span_ms"] > 0
    assert prof["decode_kernels"]["top_kernels"]
    assert "speedup vs transformers" in capsys.readouterr().out


def test_bench_with_drafts_reports_the_acceptance(tmp_path_factory, capsys):
    """`--speculative-config`: our side drafts; decode timed per token, acceptance reported."""
    parser = argparse.ArgumentParser()
    bench_command(parser)
    argv = [str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")), "--dummy-weights", "--skip-hf"]
    argv += ["--images", "8", "--output-tokens", "4", "--decode-tokens", "32"]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    r = run_bench(parser.parse_args(argv + ["--speculative-config", json.dumps(spec)]))
    print_table(r)
    assert r["speculative"]["draft_tokens"] > 0
    assert 0 <= r["speculative"]["acceptance_rate"] <= 1
    assert r["ours"]["decode_ms_per_token"] > 0
    assert "accepted" in capsys.readouterr().out


@pytest.mark.parametrize("workload", ["paths", "serve"])
def test_user_path_workloads_run_end_to_end(tmp_path_factory, tmp_path, workload, capsys):
    """`--workload paths` (Pipeline, the caption CLI) and `--workload serve` (a real server
    process under a streamed burst) on a tiny checkpoint: every number is reported."""
    parser = argparse.ArgumentParser()
    run = bench_command(parser)
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    argv = [ckpt, "--workload", workload, "--images", "8", "--output-tokens", "4"]
    argv += ["--decode-tokens", "8", "--caption-files", "16", "--ttft-calls", "3"]
    argv += ["--requests", "8", "--json", str(tmp_path / "bench.json")]
    argv += ["--bursts", "2"] if workload == "serve" else []
    assert run(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    if workload == "paths":
        assert "captioning images/s" in out and "TTFT ms, first call" in out
    else:
        assert "server / offline" in out and "TTFT p50" in out
        assert "burst 1" in out and "burst 2" in out  # the warm server's second burst
        results = json.loads((tmp_path / "bench.json").read_text())
        assert [p["ttft"] is not None for p in results["server_bursts_phases_s"]] == [True] * 2


def test_media_workload_runs_and_refuses_what_does_not_fit(tmp_path_factory, capsys):
    """`--workload media` on a tiny checkpoint (max_model_len 2048): the images and the short
    video run with a floor and a transformers time; the long videos are refused, not crashed."""
    parser = argparse.ArgumentParser()
    run = bench_command(parser)
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    args = parser.parse_args([ckpt, "--workload", "media", "--json", "/dev/null"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "448px" in out and "refused" in out and "captioning 1080p" in out
