"""Decoding videos written with PyAV's encoders, as real ones are: every sampled frame is read
back from its content (frame k shows k), so frame-exactness is asserted, not assumed."""

from __future__ import annotations

import numpy as np
import pytest

from intp_vllm.video.preprocess import ClipPreprocessConfig, preprocess_frames, resize_and_crop
from intp_vllm.core.rearrange import uniform_frame_indices
from intp_vllm.research.synthetic import decode_frame_index, index_coded_video
from intp_vllm.video.io import as_frames, read_video, sample_video, uniform_time_targets, write_video

FRAMES = 150
QUIET_X265 = {"x265-params": "log-level=error"}
NO_SCENECUT = {"x264-params": "scenecut=0"}
"""x264 adds keyframes at scene cuts; the cost tests need the GOP they asked for."""

CODECS = {
    # name: (file name, write_video keyword arguments)
    "h264-bframes-long-gop": ("h264.mp4", {"gop": 120, "b_frames": 3}),
    "h264-10bit": ("h264-10bit.mkv", {"codec": "libx264", "pix_fmt": "yuv420p10le", "gop": 60}),
    "hevc": ("hevc.mp4", {"codec": "libx265", "gop": 60, "options": QUIET_X265}),
    "hevc-10bit": ("hevc-10bit.mkv", {"codec": "libx265", "pix_fmt": "yuv420p10le", "options": QUIET_X265}),
    "vp9-webm": ("vp9.webm", {"gop": 60}),
    "vp9-live-webm": ("vp9-live.webm", {"gop": 60, "container_options": {"live": "1"}}),
    "av1": ("av1.mkv", {"codec": "libsvtav1", "gop": 60}),
    "gray-ffv1": ("gray.mkv", {"codec": "ffv1", "pix_fmt": "gray"}),
    "mjpeg-avi": ("mjpeg.avi", {}),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    """Each codec's 150-frame 320x180 index-coded video at 30 fps, written once."""
    directory = tmp_path_factory.mktemp("codecs")
    frames = index_coded_video(FRAMES, 180, 320)
    return {name: write_video(directory / file, frames, fps=30, **kwargs) for name, (file, kwargs) in CODECS.items()}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("num_frames", [1, 8, 33, FRAMES + 10])
def test_every_codec_gives_exactly_the_uniform_frames(videos, codec, num_frames):
    video = sample_video(videos[codec], num_frames)
    expected = uniform_frame_indices(FRAMES, num_frames).tolist()
    assert video.indices == expected
    assert decode_frame_index(video.frames) == expected
    assert video.frames.shape == (len(expected), 180, 320, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == FRAMES and video.fps == pytest.approx(30, rel=1e-3)
    assert video.timestamps == pytest.approx([i / 30 for i in expected], abs=1e-3)
    assert video.decoded_frames <= FRAMES  # no frame decoded twice


@pytest.mark.parametrize("codec", ["h264-bframes-long-gop", "vp9-live-webm", "av1"])
def test_bytes_and_path_give_the_same_frames(videos, codec):
    from_path = sample_video(videos[codec], 8)
    from_bytes = sample_video(videos[codec].read_bytes(), 8)
    np.testing.assert_array_equal(from_bytes.frames, from_path.frames)
    assert from_bytes.indices == from_path.indices


def test_the_negative_control_sees_a_wrong_frame():
    """decode_frame_index reads off the frame each decoded image shows, so a one-frame slip fails."""
    frames = index_coded_video(40, 72, 96)
    assert decode_frame_index(frames[[0, 13, 27, 39]]) == [0, 13, 27, 39]
    assert decode_frame_index(frames[[0, 14, 27, 39]]) != [0, 13, 27, 39]


# ------------------------------------------------------------------------------------ the plan


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    """600 frames at 30 fps (20 s), a keyframe every 30 frames, B-frames."""
    frames = index_coded_video(600, 72, 96)
    return write_video(tmp_path_factory.mktemp("gop") / "gop30.mp4", frames, fps=30, gop=30, b_frames=2,
                       options=NO_SCENECUT)


def test_sparse_targets_seek_and_decode_at_most_a_gop_each(gop_video):
    video = sample_video(gop_video, 8)
    assert decode_frame_index(video.frames) == video.indices == uniform_frame_indices(600, 8).tolist()
    assert video.decoded_frames <= 8 * 30
    assert video.decoded_frames < 600 / 3


def test_dense_targets_decode_one_pass_at_most(gop_video):
    video = sample_video(gop_video, 128)
    assert decode_frame_index(video.frames) == video.indices == uniform_frame_indices(600, 128).tolist()
    assert 560 <= video.decoded_frames <= 600


def test_one_long_gop_is_decoded_forward_not_sought_per_target(tmp_path):
    frames = index_coded_video(240, 72, 96)
    path = write_video(tmp_path / "one-gop.mp4", frames, fps=30, gop=240, b_frames=3, options=NO_SCENECUT)
    video = sample_video(path, 16)
    assert decode_frame_index(video.frames) == video.indices == uniform_frame_indices(240, 16).tolist()
    assert video.decoded_frames <= 240  # a seek per target would decode 16 x ~120


def test_sampling_stops_after_the_last_target(gop_video):
    """Two frames of 600: the first and the last; everything between is sought over."""
    video = sample_video(gop_video, 2)
    assert video.indices == [0, 599] and decode_frame_index(video.frames) == [0, 599]
    assert video.decoded_frames <= 1 + 30 + 2


def _demuxed_and_table_index(path):
    import av

    from intp_vllm.video.io import _index_packets, _table_index

    with av.open(str(path)) as container:
        table = _table_index(container, container.streams.video[0])
    with av.open(str(path)) as container:
        demuxed = _index_packets(container, container.streams.video[0])
    return demuxed, table


@pytest.mark.parametrize("b_frames", [0, 2])
def test_a_constant_rate_mp4_is_planned_from_its_sample_table_as_from_its_packets(tmp_path, b_frames):
    """The MP4 sample table (no demuxing pass) gives the very timestamps and keyframes the
    packets do: decode times shifted by the reorder delay."""
    path = write_video(tmp_path / "cfr.mp4", index_coded_video(200, 72, 96), fps=30, gop=25, b_frames=b_frames,
                       options=NO_SCENECUT)
    demuxed, table = _demuxed_and_table_index(path)
    assert table is not None and table.predicted and not demuxed.predicted
    np.testing.assert_array_equal(table.pts, demuxed.pts)
    np.testing.assert_array_equal(table.keyframes, demuxed.keyframes)


def test_variable_rate_mp4_other_codecs_and_containers_are_demuxed(tmp_path, videos):
    timestamps = [k / 30 for k in range(60)] + [2 + k / 5 for k in range(60)]
    vfr = write_video(tmp_path / "vfr.mp4", index_coded_video(120, 72, 96), fps=30, timestamps=timestamps,
                      b_frames=2)
    for path in (vfr, videos["hevc"], videos["h264-10bit"], videos["vp9-webm"]):
        assert _demuxed_and_table_index(path)[1] is None


def test_a_predicted_index_the_frames_contradict_is_refused_and_sampling_plans_again(gop_video):
    """A table-predicted index off by one frame time: the decoder stops at the first frame that
    contradicts it; sampling from the packets gives the same frames as from the table."""
    from intp_vllm.video.io import _FrameCheck, _IndexMismatch, _PacketIndex, _PlannedDecoder, _sample_pyav
    from intp_vllm.core.frame_plan import FrameRequest

    demuxed, table = _demuxed_and_table_index(gop_video)
    step = int(table.pts[1] - table.pts[0])
    wrong = _PacketIndex(table.pts + step, table.keyframes + step, predicted=True)  # a wrong reorder delay
    check = _FrameCheck(None, None, "test video")
    decoder = _PlannedDecoder(gop_video, check)
    try:
        with pytest.raises(_IndexMismatch):
            decoder.decode_planned(wrong, wrong.pts[uniform_frame_indices(600, 8)])
    finally:
        decoder.close()
    request = FrameRequest.from_kwargs({}, default_frames=8, limit=8, prefix="")
    from_table, from_packets = (_sample_pyav(gop_video, request, check, from_table=t) for t in (True, False))
    assert from_table.indices == from_packets.indices == uniform_frame_indices(600, 8).tolist()
    np.testing.assert_array_equal(from_table.frames, from_packets.frames)
    assert from_table.decoded_frames == from_packets.decoded_frames


# ---------------------------------------------------------------------- time, rotation, sizes


def test_variable_frame_rate_is_sampled_uniformly_in_time(tmp_path):
    """60 frames in the first 2 s, then 60 frames over 12 s: uniform in time, not in index."""
    timestamps = [k / 30 for k in range(60)] + [2 + k / 5 for k in range(60)]
    path = write_video(tmp_path / "vfr.mp4", index_coded_video(120, 72, 96), fps=30, timestamps=timestamps,
                       b_frames=2)
    video = sample_video(path, 8)
    span = timestamps[-1]
    instants = [span * i / 7 for i in range(8)]
    expected = [max(k for k, t in enumerate(timestamps) if t <= instant + 1e-9) for instant in instants]
    assert video.indices == expected == [0, 59, 69, 79, 89, 99, 109, 119]
    assert decode_frame_index(video.frames) == expected
    assert video.timestamps == pytest.approx([timestamps[k] for k in expected], abs=1e-3)
    assert expected != uniform_frame_indices(120, 8).tolist()


def test_uniform_time_targets_at_a_constant_rate_are_vllms_indices():
    """Timestamps rounded to milliseconds (WebM, 30 fps) still count as a constant frame rate."""
    for total, wanted in [(300, 8), (301, 32), (1000, 7), (243, 95)]:
        pts = np.round(np.arange(total) * 1000 / 30).astype(np.int64)
        assert uniform_time_targets(pts, wanted).tolist() == uniform_frame_indices(total, wanted).tolist()


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_display_rotation_is_applied(tmp_path, rotation):
    frames = index_coded_video(30, 72, 96)
    path = write_video(tmp_path / f"rot{rotation}.mp4", frames, rotation=rotation)
    video = sample_video(path, 8)
    assert video.frames.shape[1:3] == ((96, 72) if rotation in (90, 270) else (72, 96))
    upright = np.rot90(video.frames, k=-rotation // 90, axes=(1, 2))
    assert decode_frame_index(upright) == uniform_frame_indices(30, 8).tolist()
    if rotation != 180:  # the negative control: unrotated, the blocks are read in the wrong places
        assert decode_frame_index(np.rot90(video.frames, k=rotation // 90, axes=(1, 2))) != video.indices


def test_preprocessing_while_decoding_equals_preprocessing_the_decoded_frames(tmp_path):
    """resize + crop per frame as it is decoded: the same pixels as the full frames resized after."""
    frames = index_coded_video(40, 360, 640)
    path = write_video(tmp_path / "hd.mp4", frames, fps=30, gop=20, b_frames=2)
    config = ClipPreprocessConfig()
    cropped = sample_video(path, 8, preprocess=config)
    full = sample_video(path, 8)
    assert cropped.frames.shape == (8, 224, 224, 3) and cropped.indices == full.indices
    np.testing.assert_array_equal(cropped.frames, np.stack([resize_and_crop(f, config) for f in full.frames]))
    np.testing.assert_array_equal(preprocess_frames(cropped.frames, config), preprocess_frames(full.frames, config))


def test_rotated_video_is_rotated_before_it_is_cropped(tmp_path):
    frames = index_coded_video(16, 96, 160)
    path = write_video(tmp_path / "rot.mp4", frames, rotation=90)
    config = ClipPreprocessConfig(shortest_edge=56, crop_size=56)
    full = sample_video(path, 4)
    np.testing.assert_array_equal(sample_video(path, 4, preprocess=config).frames,
                                  np.stack([resize_and_crop(f, config) for f in full.frames]))


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    path = write_video(tmp_path / "thin.mp4", np.zeros((8, 4, 3000, 3), np.uint8))
    with pytest.raises(ValueError, match=r"thin.mp4' has 3000x4 frames \(aspect ratio 750:1\); at most 200:1"):
        sample_video(path, 8, preprocess=ClipPreprocessConfig())
    assert sample_video(path, 8).frames.shape == (8, 4, 3000, 3)  # full-size frames are not resized


# ------------------------------------------------------------------------------- OpenCV backend


@pytest.mark.parametrize("codec", ["h264-bframes-long-gop", "vp9-webm", "mjpeg-avi"])
def test_opencv_backend_gives_the_same_frames(videos, codec):
    ours = sample_video(videos[codec], 8, decoder="opencv")
    assert ours.indices == uniform_frame_indices(FRAMES, 8).tolist() == decode_frame_index(ours.frames)
    preprocess = ClipPreprocessConfig(shortest_edge=56, crop_size=56)
    assert sample_video(videos[codec], 8, decoder="opencv", preprocess=preprocess).frames.shape == (8, 56, 56, 3)


def test_opencv_backend_cannot_read_a_live_stream_webm(videos):
    with pytest.raises(ValueError, match="vp9-live.webm' has no video frames"):
        sample_video(videos["vp9-live-webm"], 8, decoder="opencv")


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("decoder", ["pyav", "opencv"])
def test_non_video_file_is_a_clear_error(tmp_path, decoder):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 10)
    with pytest.raises(ValueError, match="notes.mp4' is not a video (PyAV|OpenCV) can open"):
        read_video(path, 8, decoder=decoder)
    with pytest.raises(ValueError, match="missing.mp4' does not exist"):
        read_video(tmp_path / "missing.mp4", 8, decoder=decoder)


def test_bad_arguments_name_what_is_allowed(videos):
    with pytest.raises(ValueError, match=r"video decoder 'decord' is not one of \['opencv', 'pyav'\]"):
        read_video(videos["h264-bframes-long-gop"], 8, decoder="decord")
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        read_video(videos["h264-bframes-long-gop"], 0)
    with pytest.raises(ValueError, match="cannot write.*extension must be one of"):
        write_video("clip.xyz", index_coded_video(2))


def test_as_frames_accepts_arrays_lists_and_tensors():
    import torch

    video = index_coded_video(4)
    for given in (video, list(video), torch.from_numpy(video)):
        np.testing.assert_array_equal(as_frames(given), video)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "zero frames"),
        (np.zeros((0, 8, 8, 3), np.uint8), "zero frames"),
        (np.zeros((2, 8, 8, 3), np.float64), "dtype float64"),
        (np.zeros((2, 8, 8), np.uint8), r"shape \(2, 8, 8\)"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "differ in shape"),
        ("clip.mp4", "is a str"),
    ],
)
def test_as_frames_names_what_it_received(bad, message):
    with pytest.raises(ValueError, match=message):
        as_frames(bad)


# ------------------------------------------------------------------------- rate and time range


def test_a_time_range_samples_only_that_span_and_decodes_nothing_after_it(gop_video):
    """Seconds 2-4 of a 20 s, 30 fps video: frames 60..119, and decoding starts at its keyframe."""
    video = sample_video(gop_video, 8, start=2, end=4)
    expected = (60 + uniform_frame_indices(60, 8)).tolist()
    assert video.indices == decode_frame_index(video.frames) == expected
    assert video.timestamps == pytest.approx([i / 30 for i in expected], abs=1e-3)  # from the video's first frame
    assert video.decoded_frames <= 60 + 30  # the span and at most one GOP's B-frame lookahead
    assert sample_video(gop_video, 8).indices != expected  # the negative control: the whole video


@pytest.mark.parametrize("start, end, first, last", [
    ("0:05", None, 150, 599), (None, 1, 0, 29), (2.01, 2.3, 60, 68), (19.99, None, 599, 599)])
def test_open_ranges_and_mid_frame_edges(gop_video, start, end, first, last):
    """A range from the frame shown at `start` to the last frame shown before `end`."""
    video = sample_video(gop_video, 4, start=start, end=end)
    expected = (first + uniform_frame_indices(last - first + 1, 4)).tolist()
    assert video.indices == decode_frame_index(video.frames) == expected


@pytest.mark.parametrize("decoder", ["pyav", "opencv"])
def test_a_rate_gives_span_times_fps_frames_capped(gop_video, decoder):
    at_1fps = sample_video(gop_video, 64, decoder=decoder, fps=1)
    assert at_1fps.indices == decode_frame_index(at_1fps.frames) == uniform_frame_indices(600, 20).tolist()
    capped = sample_video(gop_video, 16, decoder=decoder, fps=30)
    assert capped.indices == uniform_frame_indices(600, 16).tolist()
    ranged = sample_video(gop_video, 64, decoder=decoder, fps=2, start=5, end=10)
    assert ranged.indices == decode_frame_index(ranged.frames) == (150 + uniform_frame_indices(150, 10)).tolist()


def test_a_range_of_a_variable_frame_rate_video_is_uniform_in_time(tmp_path):
    """60 frames in the first 2 s, then one frame every 0.2 s to 13.8 s: seconds 1-9 hold frames 30..94."""
    timestamps = [k / 30 for k in range(60)] + [2 + k / 5 for k in range(60)]
    path = write_video(tmp_path / "vfr.mp4", index_coded_video(120, 72, 96), fps=30, timestamps=timestamps,
                       b_frames=2)
    video = sample_video(path, 5, start=1, end=9)
    first, last = timestamps[30], timestamps[94]  # the frames shown at 1 s and last before 9 s
    instants = [first + (last - first) * i / 4 for i in range(5)]
    expected = [max(k for k, t in enumerate(timestamps) if t <= instant + 1e-9) for instant in instants]
    assert video.indices == decode_frame_index(video.frames) == expected == [30, 64, 74, 84, 94]
    assert expected != (30 + uniform_frame_indices(65, 5)).tolist()  # uniform in time, not in index
    assert video.timestamps == pytest.approx([timestamps[k] for k in expected], abs=1e-3)
    at_rate = sample_video(path, 64, fps=1, start=1, end=9)  # 8 s at 1 fps: 8 frames, even in time
    assert len(at_rate.indices) == 8 and decode_frame_index(at_rate.frames) == at_rate.indices


def test_a_range_past_the_end_is_refused_before_any_frame_is_decoded(tmp_path):
    """Its packets are intact (demuxing finds 20 s) but their data is zeroed: only decoding would fail."""
    path = write_video(tmp_path / "clip.mp4", index_coded_video(600, 72, 96), fps=30, gop=30)
    data = bytearray(path.read_bytes())
    mdat = data.index(b"mdat") + 4
    moov = data.index(b"moov")
    assert mdat < moov  # the index comes after the frame data
    data[mdat + 64: moov - 64] = bytes(moov - 128 - mdat)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"start=25 s is at or past the end of video file '.*broken.mp4' \(20 s long"):
        sample_video(broken, 8, start=25)
    with pytest.raises(ValueError, match="broken.mp4"):  # the control: a range inside it decodes, and fails
        sample_video(broken, 8, start=5, end=6)


def test_rate_and_range_arguments_are_checked(gop_video):
    with pytest.raises(ValueError, match=r"fps=-1: expected frames a second of video, a number > 0"):
        sample_video(gop_video, 8, fps=-1)
    with pytest.raises(ValueError, match=r"end=2 must be after start=3"):
        sample_video(gop_video, 8, start=3, end=2)
