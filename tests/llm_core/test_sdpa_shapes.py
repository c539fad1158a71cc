"""Bucket lengths and cuDNN shape admission (`attention/sdpa_shapes.py`); the padded routes'
numerics are in test_causal_sdpa.py (CPU) and test_varlen_sdpa_gpu.py (CUDA)."""

from __future__ import annotations

import threading

import pytest

from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes, bucket_down, bucket_up


def test_buckets_pad_by_less_than_an_eighth():
    assert [bucket_up(n) for n in (1, 16, 17, 1024, 1025, 2725, 16384, 38306)] == [
        16, 16, 32, 1024, 1152, 2816, 16384, 40960,
    ]  # fmt: skip
    assert [bucket_down(n) for n in (5, 37, 100, 1100, 16384, 20000)] == [
        0,
        32,
        96,
        1024,
        16384,
        18432,
    ]
    for n in range(1, 70000, 37):
        up, down = bucket_up(n), bucket_down(n)
        assert down <= n <= up and up - n < max(16, n / 8) and n - down < max(16, n / 8)
        assert bucket_up(up) == up and bucket_down(down) == down  # buckets are fixed points
    # few shapes: every length from SDPA_MIN_CAUSAL to a 16k chunk lands on 33 lengths
    assert len({bucket_up(n) for n in range(1024, 16385)}) == 33


def test_second_sight_builds_once():
    shapes = SdpaShapes("second")
    assert [shapes.admit(("a",)) for _ in range(3)] == [False, True, True]
    assert shapes.built() == {("a",)}
    assert SdpaShapes("first").admit(("a",))
    exact = SdpaShapes("exact")
    assert exact.admit(("b",)) and exact.up(2725) == 2725 and exact.down(1100) == 1100
    assert shapes.up(2725) == 2816 and shapes.down(1100) == 1024


def test_building_admits_all_or_none():
    shapes = SdpaShapes("second")
    with shapes.building(False):
        assert not shapes.admit(("a",)) and not shapes.admit(("a",))
    assert shapes.built() == set() and not shapes.admit(("a",))  # its first counted sight
    with shapes.building(True):
        assert shapes.admit(("b",))
    assert shapes.built() == {("b",)} and shapes.admit(("b",))


def test_built_shapes_are_per_thread():
    """torch's cuDNN plans are thread-local: a shape another thread built is new here."""
    shapes = SdpaShapes("second")
    with shapes.building(True):
        shapes.admit(("a",))
    seen = []
    worker = threading.Thread(target=lambda: seen.append((shapes.admit(("a",)), shapes.built())))
    worker.start()
    worker.join()
    assert seen == [(False, frozenset())] and shapes.admit(("a",))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="sdpa_shapes='fast'"):
        SdpaShapes("fast")


def test_segment_groups_keep_small_counts_whole_and_split_large_ones_by_powers_of_2():
    from polymodal.llm_core.attention.triton_backend import WHOLE_SEGMENTS, segment_groups

    assert [segment_groups(n) for n in (1, 5, 8)] == [[1], [5], [8]]
    assert segment_groups(25) == [16, 8, 1]
    assert segment_groups(13) == [8, 5]
    assert segment_groups(29) == [16, 8, 5]
    shapes = set()
    for n in range(1, 300):
        groups = segment_groups(n)
        assert sum(groups) == n and groups == sorted(groups, reverse=True)
        large = [g for g in groups if g > WHOLE_SEGMENTS]
        assert all(g & (g - 1) == 0 for g in large) and len(set(large)) == len(large)
        assert sum(g <= WHOLE_SEGMENTS for g in groups) <= 1 + (WHOLE_SEGMENTS in groups)
        shapes.update(groups)
    assert len(shapes) == WHOLE_SEGMENTS + 5  # 1..8, then 16, 32, 64, 128, 256
