"""Fuzzing the video input path: random and mutated container bytes into `read_video` and the
server's loader (`IntpVideoLoader`) must give frames within the limits or a ValueError, never
a crash, a hang or another exception. Derandomized, so every run tries the same inputs."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from intp_vllm.vllm_ext.media import IntpVideoLoader
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import VideoLimits, read_video, write_video

FRAMES = 8
FUZZ = settings(max_examples=250, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONTAINERS = {"mp4": {"gop": 6, "b_frames": 2}, "mkv": {"codec": "libx265", "options": {"x265-params": "log-level=error"}},
              "webm": {"gop": 6}, "avi": {}}
"""Seed videos, written with PyAV's encoders (H.264 with B-frames, HEVC, VP9, MJPEG), so that
mutations reach each demuxer and decoder a real upload would."""


@functools.cache
def seed_video(container: str) -> bytes:
    """A small real video (12 frames, 64x48) in `container`."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(os.path.join(tmp, f"seed.{container}"), moving_shapes_video(num_frames=12, height=48,
                                                                                       width=64), **CONTAINERS[container])
        return path.read_bytes()


def malformed_dref_mp4(mp4: bytes) -> bytes:
    """The mp4 with its data-reference entry claiming ~4 GB: OpenCV's in-memory stream
    reader (what vLLM's own loader uses) segfaults on it; found by this fuzzer."""
    data = bytearray(mp4)
    tag = data.find(b"dref")
    data[tag + 12] = 0xEC  # size of the first entry: 0x0000000C -> 0xEC00000C
    return bytes(data)


def decode_or_reject(data: bytes) -> None:
    """Both entry points (unlimited, and the server's with its default limits): valid frames,
    or a ValueError with a message."""
    for decode, max_pixels in ((lambda: read_video(data, FRAMES), None),
                               (lambda: IntpVideoLoader.load_bytes(data, num_frames=FRAMES)[0],
                                VideoLimits().max_frame_pixels)):
        try:
            frames = decode()
        except ValueError as exc:
            assert str(exc)
            continue
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        assert 1 <= len(frames) <= FRAMES
        assert max_pixels is None or frames.shape[1] * frames.shape[2] <= max_pixels


@st.composite
def mutated_video(draw) -> bytes:
    """A real video with a few bytes set, runs zeroed or copied, bytes inserted, or a cut."""
    data = bytearray(seed_video(draw(st.sampled_from(sorted(CONTAINERS)))))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["set", "zero", "copy", "insert", "cut"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "zero":
            data[at:at + draw(st.integers(1, 64))] = bytes(64)[: len(data[at:at + 64])]
        elif kind == "copy":
            source = draw(st.integers(0, len(data) - 1))
            data[at:at + 16] = data[source:source + 16]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
        if len(data) < 2:
            break
    return bytes(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_rejected_cleanly(data):
    decode_or_reject(data)


@FUZZ
@given(st.sampled_from(sorted(CONTAINERS)), st.binary(min_size=1, max_size=256))
def test_a_real_header_with_random_bytes_after_it_is_handled(container, tail):
    decode_or_reject(seed_video(container)[:64] + tail)


@settings(FUZZ, max_examples=600)
@given(mutated_video())
@example(malformed_dref_mp4(seed_video("mp4")))
def test_mutated_videos_decode_or_are_rejected_cleanly(data):
    decode_or_reject(data)


def test_the_seed_videos_decode():
    """Without this the fuzzer could be mutating videos that never decoded in the first place."""
    for container in CONTAINERS:
        assert read_video(seed_video(container), FRAMES).shape == (FRAMES, 48, 64, 3)
