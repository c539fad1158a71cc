"""The executor boundary: engine -> executor -> one worker process per tensor-parallel rank.

`tensor_parallel_size == 1` has no executor: the engine's `ModelRunner` runs the model in the
engine's process, as it always did. With N ranks, `TPExecutor` spawns ranks 1..N-1 as worker
processes (`run_worker`); rank 0 is the engine's own runner (as in nano-vllm), so the
scheduler, the KV-cache manager, the encoder cache and the sampler stay in the engine process
and only rank 0 returns sampled tokens. Each step, rank 0's runner hands `run_step` the flat
batch it built (`HostBatch`: ids, positions, slots, block tables, as host lists) and the step's
media embeddings; the executor sends the batch down one pipe per worker (pickled) and
broadcasts the embeddings over the process group (rank 0 runs the vision tower, replicated on
every rank but run only there). Then every rank runs the same forward; the collectives inside
the layers (all-reduces, the LM head's gather to rank 0) keep the ranks in lock step, so a
worker needs no reply channel. Workers learn which rows get logits from the batch alone
(`logit_rows`), mirroring the runner's LM-head calls.

A worker exits when its pipe closes (the engine is gone) or on `None` (`shutdown`); a worker
that fails to build reports its traceback before rank 0's first collective (`wait_ready`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.engine_config import EngineConfig, build_rank, resolve_model
from polymodal.llm_core.errors import EngineDeadError, InvalidInputError, ModelLoadError
from polymodal.llm_core.host_copy import to_device
from polymodal.llm_core.layers.embedding import merge_multimodal_embeddings
from polymodal.llm_core.registry import model_class
from polymodal.llm_core.runner import PROMPT_LOGPROB_CHUNK
from polymodal.llm_core.step_batch import HostBatch
from polymodal.llm_core.tensor_parallel import TPGroup, check_heads, join_group

START_TIMEOUT_S = 120.0  # a worker's interpreter start and imports
READY_TIMEOUT_S = 600.0  # a worker's model build (loading its slice of the checkpoint)
JOIN_TIMEOUT_S = 10.0  # a worker's exit after `shutdown`, before it is killed


@dataclass
class StepMessage:
    """One step as a worker needs it: the flat batch (without the Request objects it points
    at), and the shape and dtype of the media embeddings rank 0 broadcasts (None: none)."""

    batch: HostBatch
    media_rows: list[int] | None = None  # flat rows the broadcast embeddings go to
    media_shape: tuple[int, ...] | None = None
    media_dtype: torch.dtype | None = None


def logit_rows(batch: HostBatch) -> list[list[int] | None]:
    """The rows of `hidden` each LM-head call of rank 0's runner takes, in its order: prompt
    logprob chunks (`ModelRunner._prompt_logprobs`), then the sampled rows (`sample`; None:
    every row). Rank 0 gathers logits from every rank at each call, so workers make the same."""
    calls: list[list[int] | None] = []
    prompt_rows = [offset + p - start for _, offset, start, end in batch.prompt_logprob_spans
                   for p in range(start, end)]  # fmt: skip
    for lo in range(0, len(prompt_rows), PROMPT_LOGPROB_CHUNK):
        calls.append(prompt_rows[lo : lo + PROMPT_LOGPROB_CHUNK])
    if batch.sample_rows:
        full = len(batch.sample_rows) == len(batch.ids)
        calls.append(None if full else list(batch.sample_rows))
    return calls


def check_tensor_parallel(mc: ModelConfig, cfg: EngineConfig, device: torch.device) -> None:
    """InvalidInputError naming what stops `cfg.tensor_parallel_size` ranks for this model."""
    size = cfg.tensor_parallel_size
    if not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"tensor_parallel_size={size!r}: must be an integer >= 1")
    if size == 1:
        return
    what = f"tensor_parallel_size={size}"
    if not model_class(mc.architecture).splits_over_ranks():
        raise InvalidInputError(
            f"{what}: {mc.architecture} does not support tensor parallelism yet "
            f"(families that do: {', '.join(tensor_parallel_architectures())})"
        )
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise InvalidInputError(
            f"{what}, but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if device.type not in ("cuda", "cpu"):
        raise InvalidInputError(f"{what}: runs on CUDA (NCCL) or the CPU (gloo), not {device}")
    check_heads(mc.num_heads, mc.num_kv_heads, size)
    if mc.intermediate_size % size:
        raise InvalidInputError(
            f"{what} does not divide the model's intermediate_size={mc.intermediate_size}"
        )
    not_yet = {
        "quantization": cfg.quantization is not None or mc.quantization_config is not None,
        "enable_lora": cfg.enable_lora,
        "a pooling task": mc.task != "generate",
    }
    for name, used in not_yet.items():
        if used:
            raise InvalidInputError(f"{what} with {name} is not supported yet")


def tensor_parallel_architectures() -> list[str]:
    """The registry's architectures whose model class splits over ranks."""
    from polymodal.llm_core.registry import MODELS

    names = []
    for arch in MODELS:
        try:
            if model_class(arch).splits_over_ranks():
                names.append(arch)
        except Exception:  # a family whose optional dependency is missing
            continue
    return names


class TPExecutor:
    """Ranks 1..N-1 of a tensor-parallel engine, as spawned processes; `group` is rank 0's
    membership of their process group (the engine builds rank 0 with it)."""

    def __init__(self, model_path: str | Path, cfg, backend: str):
        size = cfg.tensor_parallel_size
        self._dir = tempfile.mkdtemp(prefix="polymodal-tp-")
        store = str(Path(self._dir) / "store")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        self.procs, self.conns = [], []
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker,
                args=(rank, size, store, str(model_path), cfg, backend, child),
                name=f"polymodal-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, self._dir)
        # join only once every worker is about to: a worker that died starting up (an import
        # error) would otherwise leave rank 0 in the rendezvous until its timeout
        self._expect("joining", START_TIMEOUT_S)
        try:
            self.group: TPGroup = join_group(0, size, store, backend)
        except Exception:
            self.shutdown()
            raise

    @classmethod
    def start(cls, model: str | Path, cfg: EngineConfig) -> TPExecutor:
        """Check that `cfg.tensor_parallel_size` ranks can split this model (InvalidInputError
        naming what stops them, before any process starts), then start the workers."""
        from polymodal.llm_core.loader import resolve_model_path

        path = resolve_model_path(model, cfg.revision, cfg.hf_token, cfg.download_dir)
        model_config, device, _, _ = resolve_model(path, cfg)
        check_tensor_parallel(model_config, cfg, device)
        return cls(path, cfg, "nccl" if device.type == "cuda" else "gloo")

    def wait_ready(self) -> None:
        """Wait until every worker built its model; ModelLoadError with a worker's traceback
        if one failed or died."""
        self._expect("ready", READY_TIMEOUT_S)

    def _expect(self, expected: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.shutdown()
                    why = "timed out" if proc.is_alive() else f"exited ({proc.exitcode})"
                    raise ModelLoadError(f"tensor-parallel rank {rank} {why} while starting")
            status, detail = conn.recv()
            if status != expected:
                self.shutdown()
                raise ModelLoadError(f"tensor-parallel rank {rank} failed to start:\n{detail}")

    def run_step(self, batch: HostBatch, media_rows, media) -> None:
        """Start every worker on this step (rank 0 then runs its own share)."""
        spans = [(None, *span[1:]) for span in batch.prompt_logprob_spans]  # rows, no Requests
        msg = StepMessage(dataclasses.replace(batch, prompt_logprob_spans=spans))
        if media is not None:
            msg.media_rows = media_rows.tolist()
            msg.media_shape, msg.media_dtype = tuple(media.shape), media.dtype
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(msg)
            except OSError as exc:  # a broken pipe: the worker is gone
                code = self.procs[rank - 1].exitcode
                raise EngineDeadError(
                    f"tensor-parallel rank {rank} exited (exit code {code}); "
                    "the engine cannot run steps any more"
                ) from exc
        if media is not None:
            self.group.broadcast(media.contiguous())

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force) and remove the store; idempotent."""
        self._finalizer()


def _shutdown(procs, conns, store_dir) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):  # the worker is gone already
            pass
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT_S)
    for conn in conns:
        conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


# ---- the worker process ------------------------------------------------------------------
class Worker:
    """One rank > 0: its shard of the model and the KV cache, running the steps it is sent."""

    def __init__(self, rank: int, size: int, store: str, model_path: str, cfg, backend, conn):
        if backend == "nccl":
            torch.cuda.set_device(rank)
        conn.send(("joining", None))
        self.group = join_group(rank, size, store, backend)
        path = Path(model_path)
        model_config, device, cfg, max_len = resolve_model(path, cfg, rank)

        def report_ready() -> None:  # before the first collective, which rank 0 joins next
            conn.send(("ready", None))

        parts = build_rank(path, model_config, cfg, device, max_len, self.group, report_ready)
        self.model, self.runner = parts.net, parts.runner

    @torch.inference_mode()
    def execute(self, msg: StepMessage) -> None:
        """The step's forward and LM-head calls, as rank 0's runner makes them."""
        runner, batch = self.runner, msg.batch
        media = None
        if msg.media_shape is not None:  # first, as rank 0 broadcasts them first
            media = torch.empty(msg.media_shape, dtype=msg.media_dtype, device=runner.device)
            self.group.broadcast(media)
        input_ids, positions, meta = runner.prepare(None, batch)
        embeds = self.model.embed(input_ids)
        if media is not None:
            rows = to_device(msg.media_rows, torch.int64, runner.device)
            embeds = merge_multimodal_embeddings(embeds, rows, media)
        hidden = self.model(positions, embeds, runner.kv_caches, meta)
        for rows in logit_rows(batch):
            picked = hidden if rows is None else hidden[to_device(rows, torch.int64, hidden.device)]
            self.model.compute_logits(picked)  # this rank's share of the gather to rank 0


def run_worker(rank, size, store, model_path, cfg, backend, conn) -> None:
    """A worker process's main: build, report, then run steps until told to stop."""
    try:
        worker = Worker(rank, size, store, model_path, cfg, backend, conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the engine's process is gone
            return
        if msg is None:
            return
        worker.execute(msg)
