"""Legacy encodings from the field reports, written with PyAV's own encoders: MPEG-4 Part 2 in
AVI with B-frames (timestamps out of order in decode order), Cinepak in AVI with dropped
frames, MS-MPEG4v3 (DivX 3) in AVI, H.264 with an AAC audio track. The server's decoder
(`sample_video`, from a path and from bytes) must give frames uniform in presentation time,
pixel for pixel the frames a full decode shows at those times.

Each frame shows its own index (`index_coded_video`), so the frame shown at an instant is
known without trusting any decoder. (FFmpeg has no encoder for DivX's *packed* B-frames,
two frames in one AVI chunk; those are unpacked by FFmpeg's demuxer path and not tested here.)
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from intp_vllm.core.rearrange import uniform_frame_indices
from intp_vllm.research.synthetic import decode_frame_index, index_coded_video
from intp_vllm.video.io import sample_video

SLOTS = 90
"""Frame slots at 30 fps (3 s)."""
HEIGHT, WIDTH = 144, 176
DROPPED = frozenset({5, 6, 7, 20, 41, 42, 60, 61, 62, 63})
"""Cinepak slots left empty, as capture cards drop frames (AVI writes zero-size chunks)."""

LEGACY = {
    # name: (file, encoder, options)
    "mpeg4-part2-bframes-avi": ("mpeg4.avi", "mpeg4", {"b_frames": 2}),
    "cinepak-dropped-frames-avi": ("cinepak.avi", "cinepak", {"pix_fmt": "rgb24", "dropped": DROPPED}),
    "msmpeg4v3-avi": ("divx3.avi", "msmpeg4", {}),
    "h264-aac-mp4": ("h264-aac.mp4", "libx264", {"b_frames": 2, "audio": True}),
}


def write_legacy(path: Path, encoder: str, b_frames: int = 0, pix_fmt: str = "yuv420p",
                 dropped: frozenset = frozenset(), audio: bool = False) -> Path:
    """SLOTS index-coded frames at 30 fps (minus `dropped`), a keyframe every 30, optionally
    with a mono AAC track interleaved as a muxer writes it."""
    import av

    frames = index_coded_video(SLOTS, HEIGHT, WIDTH)
    with av.open(str(path), "w") as container:
        video = container.add_stream(encoder, rate=30)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, pix_fmt
        video.codec_context.gop_size = 30
        video.codec_context.max_b_frames = b_frames
        sound = container.add_stream("aac", rate=44100) if audio else None
        for k in range(SLOTS):
            if k not in dropped:
                picture = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
                picture.pts, picture.time_base = k, Fraction(1, 30)
                container.mux(video.encode(picture))
            if sound is not None:
                tone = (0.1 * np.sin(np.arange(k * 1470, (k + 1) * 1470) / 7.0)).astype(np.float32)[None]
                samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                samples.sample_rate, samples.pts, samples.time_base = 44100, k * 1470, Fraction(1, 44100)
                container.mux(sound.encode(samples))
        container.mux(video.encode())
        if sound is not None:
            container.mux(sound.encode())
    return path


def full_decode(path: Path) -> tuple[list[int], np.ndarray]:
    """Every frame of the video stream in presentation order: (pts, RGB frames)."""
    import av

    with av.open(str(path)) as container:
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    decoded.sort(key=lambda item: item[0])
    return [pts for pts, _ in decoded], np.stack([image for _, image in decoded])


def shown_at_uniform_instants(num_frames: int, dropped: frozenset) -> list[int]:
    """The slot whose frame is on screen at each of `num_frames` instants spread uniformly from
    the first to the last frame (a dropped slot shows the frame before it)."""
    kept = [k for k in range(SLOTS) if k not in dropped]
    instants = [kept[0] + (kept[-1] - kept[0]) * i // (num_frames - 1) for i in range(num_frames)]
    return [max(k for k in kept if k <= instant) for instant in instants]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("legacy")
    return {name: write_legacy(directory / file, encoder, **options)
            for name, (file, encoder, options) in LEGACY.items()}


def test_the_files_are_what_the_field_reports_had(legacy):
    import av

    def packet_pts(name):
        with av.open(str(legacy[name])) as container:
            return [p.pts for p in container.demux(video=0) if p.size]

    mpeg4 = packet_pts("mpeg4-part2-bframes-avi")
    assert mpeg4 != sorted(mpeg4)  # B-frames: decode order is not presentation order
    assert len(packet_pts("cinepak-dropped-frames-avi")) == SLOTS - len(DROPPED)
    with av.open(str(legacy["msmpeg4v3-avi"])) as container:
        assert container.streams.video[0].codec_context.name == "msmpeg4"  # DivX ;-) 3, fourcc DIV3/MP43
    with av.open(str(legacy["h264-aac-mp4"])) as container:
        assert [s.codec_context.name for s in container.streams] == ["h264", "aac"]


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("num_frames", [8, 16, 33])
def test_frames_are_uniform_in_presentation_time_and_exactly_the_full_decode_s(legacy, name, num_frames):
    dropped = LEGACY[name][2].get("dropped", frozenset())
    _, frames = full_decode(legacy[name])
    kept = [k for k in range(SLOTS) if k not in dropped]
    assert decode_frame_index(frames) == kept  # the reference shows each kept slot once, in order
    expected = shown_at_uniform_instants(num_frames, dropped)
    if not dropped:
        assert expected == uniform_frame_indices(SLOTS, num_frames).tolist()
    positions = [kept.index(slot) for slot in expected]  # those frames' places in the full decode
    for source in (legacy[name], legacy[name].read_bytes()):
        video = sample_video(source, num_frames)
        assert decode_frame_index(video.frames) == expected
        assert video.indices == positions
        np.testing.assert_array_equal(video.frames, frames[positions])


def test_the_negative_control_sees_a_frame_one_slot_off(legacy):
    """Comparing against the full decode catches a one-frame slip on the lossiest codec."""
    _, frames = full_decode(legacy["cinepak-dropped-frames-avi"])
    video = sample_video(legacy["cinepak-dropped-frames-avi"], 8)
    slipped = [min(i + 1, len(frames) - 1) for i in video.indices]
    assert not np.array_equal(video.frames, frames[slipped])
