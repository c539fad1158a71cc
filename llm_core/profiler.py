"""vLLM's `start_profile` / `stop_profile`: a torch profiler trace of what the engine runs in
between (host and, on CUDA, device activity), written as a Chrome / Perfetto trace
(`<host>_<pid>.<ms>.pt.trace.json`) into the directory `VLLM_TORCH_PROFILER_DIR` names (vLLM's
switch; without it the calls are refused). For where time goes per phase and kernel, `polymodal
bench --profile` prints tables instead."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch

from polymodal.llm_core.errors import InvalidInputError

ENV = "VLLM_TORCH_PROFILER_DIR"


def trace_dir() -> Path | None:
    """The trace directory the environment names, or None."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


def start_profile(engine) -> None:
    """Start recording `engine`'s work (one recording at a time)."""
    folder = trace_dir()
    if folder is None:
        raise InvalidInputError(f"start_profile needs {ENV} set to a directory for the traces")
    if getattr(engine, "profiler", None) is not None:
        raise InvalidInputError("a profile is already being recorded: call stop_profile() first")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True)
    profiler.start()
    engine.profiler = profiler


def stop_profile(engine) -> str:
    """Stop the recording and write its trace; returns the file's path."""
    profiler = getattr(engine, "profiler", None)
    if profiler is None:
        raise InvalidInputError("no profile is being recorded: call start_profile() first")
    engine.profiler = None
    profiler.stop()
    folder = trace_dir() or Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{socket.gethostname()}_{os.getpid()}.{int(time.time() * 1000)}.pt.trace.json"
    path = folder / name
    profiler.export_chrome_trace(str(path))
    return str(path)
