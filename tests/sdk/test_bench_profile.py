"""The profile's arithmetic over kernel intervals: busy time, marginal cost, idle gaps."""

from polymodal.bench import profile as bench_profile
from polymodal.bench import trace

# (start, end, name) in microseconds: a and b overlap (PDL), then a 5 us gap, c, a 2 us gap, a
SPANS = [(0.0, 10.0, "a"), (8.0, 12.0, "b"), (17.0, 20.0, "c"), (22.0, 23.0, "a")]


def test_busy_marginal_and_gaps(monkeypatch):
    monkeypatch.setattr(trace, "_device_spans", lambda prof, exclude=(): SPANS)
    assert trace.busy_seconds(None) * 1e6 == 12 + 3 + 1
    charged = {r["name"]: r["ms_per_step"] * 1e3 for r in trace.exclusive_ms(None, 1, 9)}
    assert charged == {"a": 11.0, "b": 2.0, "c": 3.0}
    gaps = {r["name"]: r["ms_per_step"] * 1e3 for r in trace.idle_gaps(None, 1, 9)}
    assert gaps == {"b -> c": 5.0, "c -> a": 2.0}


class _Event:
    """The fields of a profiler `FunctionEvent` that `gap_hosts` reads (a CPU event)."""

    def __init__(self, name, start, end, parent=None, thread=1):
        from types import SimpleNamespace

        from torch.autograd import DeviceType

        self.name, self.thread, self.cpu_parent = name, thread, parent
        self.time_range = SimpleNamespace(start=start, end=end)
        self.device_type = DeviceType.CPU


def test_gap_hosts_names_the_host_work_inside_each_gap(monkeypatch):
    """Gaps b -> c (12..17 us) and c -> a (20..22): the engine thread's ranges and ops that ran
    then, by self time; another thread's work (media processing) is left out."""
    monkeypatch.setattr(trace, "_device_spans", lambda prof, exclude=(): SPANS)
    step = _Event("engine.step", 0.0, 30.0)
    launch_b = _Event("cudaLaunchKernel", 7.0, 8.0, step)
    prepare = _Event("prepare (device inputs)", 11.0, 16.5, step)  # 4.5 us in the first gap
    copy = _Event("aten::copy_", 13.0, 15.0, prepare)  # 2 of them its own
    launch_c = _Event("cudaLaunchKernel", 16.5, 17.0, step)
    sync = _Event("cudaStreamSynchronize", 19.0, 21.5, step)
    other = _Event("resize", 0.0, 30.0, thread=2)
    events = [step, launch_b, prepare, copy, launch_c, sync, other]
    prof = type("Prof", (), {"events": lambda self: events})()
    rows = trace.gap_hosts(prof, pairs=2)
    assert [(r["pair"], r["gaps"], r["idle_ms"] * 1e3) for r in rows] == [
        ("b -> c", 1, 5.0),
        ("c -> a", 1, 2.0),
    ]
    first = {op["name"]: op["ms"] * 1e3 for op in rows[0]["host_ms"]}
    assert first == {"prepare (device inputs)": 2.5, "aten::copy_": 2.0, "cudaLaunchKernel": 0.5,
                     "engine.step": 0.0}  # fmt: skip
    assert rows[0]["ranges"] == ["engine.step", "prepare (device inputs)"]
    second = {op["name"]: op["ms"] * 1e3 for op in rows[1]["host_ms"]}
    assert second == {"cudaStreamSynchronize": 1.5, "engine.step": 0.5}
    assert rows[1]["ranges"] == ["engine.step", "cudaStreamSynchronize"]


def test_engine_ranges_name_a_steps_phases(tmp_path_factory):
    """A tiny Qwen2.5-VL engine's image request on the CPU under `engine_ranges`: the profile
    holds the step's phases and the attention routes as ranges; unwrapped after."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from polymodal import LLM, SamplingParams
    from tests.helpers import tiny_checkpoint

    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")), dtype="float32",
              device="cpu", num_kv_blocks=64)  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    parts = [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    methods = bench_profile.engine_ranges(llm.engine)
    with bench_profile._annotated(methods):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate([{"role": "user", "content": parts}], params, use_tqdm=False)
    names = {e.name for e in prof.events()}
    for label in ("engine.step", "schedule", "host_batch", "prepare (device inputs)", "encode",
                  "decoder forward (eager)", "sample", "attention: paged kernel",
                  "attention: encoder segments"):  # fmt: skip
        assert label in names, label
    assert all(name not in vars(obj) for obj, name, _ in methods)  # unwrapped
