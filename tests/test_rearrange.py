"""Frame sampling and the INTP permutation: properties for all F, N and exact examples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intp_vllm.core.rearrange import (
    GROUPINGS,
    consecutive_groups,
    interleaved_groups,
    pad_frame_indices,
    padded_frame_count,
    time_order_permutation,
    uniform_frame_indices,
)


@st.composite
def frames_and_window(draw):
    n = draw(st.integers(1, 16))
    k = draw(st.integers(1, 256 // n))
    return k * n, n


@settings(max_examples=200, deadline=None)
@given(frames_and_window(), st.sampled_from(sorted(GROUPINGS)))
def test_groups_hold_every_frame_once_and_order_is_restored(fn, grouping):
    f, n = fn
    groups = GROUPINGS[grouping](f, n)
    assert groups.shape == (f // n, n)
    assert sorted(groups.ravel().tolist()) == list(range(f))
    encoded = groups.ravel() * 10  # "encoder output" row i belongs to frame groups.ravel()[i]
    assert (encoded[time_order_permutation(groups)] == np.arange(f) * 10).all()


@settings(max_examples=200, deadline=None)
@given(frames_and_window())
def test_each_interleaved_group_spans_the_whole_video(fn):
    f, n = fn
    k = f // n
    groups = interleaved_groups(f, n)
    for j, group in enumerate(groups):
        assert group.tolist() == list(range(j, f, k))


@settings(max_examples=200, deadline=None)
@given(frames_and_window())
def test_consecutive_group_j_is_the_jth_chunk(fn):
    f, n = fn
    for j, group in enumerate(consecutive_groups(f, n)):
        assert group.tolist() == list(range(j * n, (j + 1) * n))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000), st.integers(1, 300))
def test_uniform_indices_follow_vllms_linspace(total, wanted):
    indices = uniform_frame_indices(total, wanted)
    assert (indices == np.linspace(0, total - 1, min(total, wanted), dtype=int)).all()
    assert indices[0] == 0 and len(set(indices.tolist())) == len(indices) == min(total, wanted)
    assert len(indices) == 1 or indices[-1] == total - 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 256), st.integers(1, 16))
def test_padded_frames_can_always_be_grouped(frames, n):
    indices = pad_frame_indices(frames, n)
    assert len(indices) == padded_frame_count(frames, n) < frames + n
    assert interleaved_groups(len(indices), n).shape == (len(indices) // n, n)


def test_examples():
    assert interleaved_groups(32, 8)[0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert interleaved_groups(32, 8)[3].tolist() == [3, 7, 11, 15, 19, 23, 27, 31]
    assert consecutive_groups(16, 8).tolist() == [list(range(8)), list(range(8, 16))]
    assert time_order_permutation(interleaved_groups(4, 2)).tolist() == [0, 2, 1, 3]
    assert uniform_frame_indices(90, 8).tolist() == [0, 12, 25, 38, 50, 63, 76, 89]
    assert uniform_frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("frames, padded", [(1, 8), (3, 8), (8, 8), (10, 16), (64, 64), (65, 72)])
def test_padding_repeats_the_last_frame(frames, padded):
    assert padded_frame_count(frames, 8) == padded
    indices = pad_frame_indices(frames, 8)
    assert indices.tolist() == list(range(frames)) + [frames - 1] * (padded - frames)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: interleaved_groups(30, 8), r"num_frames \(30\) must be a multiple of encoder_frames \(8\)"),
        (lambda: consecutive_groups(12, 8), r"num_frames \(12\) must be a multiple of encoder_frames \(8\)"),
        (lambda: uniform_frame_indices(0, 8), "total_frames must be a positive integer, got 0"),
        (lambda: uniform_frame_indices(10, -1), "num_frames must be a positive integer, got -1"),
        (lambda: pad_frame_indices(0, 8), "num_frames must be a positive integer, got 0"),
        (lambda: padded_frame_count(4, 0), "encoder_frames must be a positive integer, got 0"),
        (lambda: time_order_permutation(np.array([[0, 0], [1, 2]])), "every frame index 0..F-1 exactly once"),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
