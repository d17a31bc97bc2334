"""Video input: decode only the sampled frames of a file or bytes, preprocess each as it is decoded.

Decoder: PyAV (FFmpeg with its codecs bundled in the `av` wheel: H.264, HEVC, VP8/VP9, AV1,
10-bit, ...). OpenCV's FFmpeg build stays as a second backend behind the same interface
(`decoder="opencv"`); `DECODERS` says how each one samples.

Sampling (PyAV) is uniform in **presentation time** over the whole video: with first and last
frame timestamps a and b, target i of n is the last frame shown at or before a + i(b - a)/(n - 1),
so first and last frame are included. At a constant frame rate (every frame interval within
one time-base tick of the mean: timestamps rounded to milliseconds count as constant) the
frames are exactly `rearrange.uniform_frame_indices` (vLLM's and decord's index convention).
At a variable frame rate (screen and browser recordings) sampling stays even in time; a
frame shown for a long time may be sampled more than once (`uniform_time_targets`).
A request may sample by rate (`fps`) and within a time range (`start`/`end`) instead:
`core.frame_plan` decides how many frames and over which span, `span_targets` which ones
(the same uniform-in-time rule over the span), and nothing after the span is decoded.
Timestamps come from one pass over the packets (demuxing, no decoding), which also finds the
keyframes and counts the frames of streams that state neither (live-stream WebM); a
constant-rate H.264 MP4 needs no pass: its sample table gives them (`_table_index`), and
every decoded frame is checked against it (a contradiction plans again from the packets).
Decoding then follows a plan: a target in the same GOP as the current position is reached by
decoding forward, and the decoder seeks only when a keyframe lies between the current position
and the next target. So the cost is at most min(one decoding pass, one seek per target) plus
the plan's input (measured: `benchmarks/decode_cost.py`), no frame is decoded twice,
and decoding stops after the last target. Display rotation (phone videos) is applied.

With a `ClipPreprocessConfig` each sampled frame is resized and centre-cropped
(`preprocess.resize_and_crop`, bit-exact with HF; opt-in, on the torch device its `device`
names) as soon as it is decoded, so memory holds crop x crop x 3 bytes a frame plus the frames
in the decoder's pipeline, whatever the resolution; frames whose size changes mid-stream are
fine. Without it, frames come back at full resolution, written into one preallocated array as
they are decoded.

For untrusted input, `VideoLimits` caps the encoded size, the frames sampled, the pixels per
frame and (with preprocessing) the aspect ratio, checked before any frame is decoded. FFmpeg
may open only real containers (`DEMUXERS`). Every failure is a ValueError naming the input and
what is allowed.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from fractions import Fraction
from itertools import chain
from pathlib import Path

import numpy as np

from PIL import Image

from intp_vllm.video.preprocess import ClipPreprocessConfig, check_aspect_ratio, resize_and_crop, rotate
from intp_vllm.core.rearrange import uniform_frame_indices
from intp_vllm.core.checks import check_positive_int
from intp_vllm.core.frame_plan import FrameRequest

EXPECTED_FRAMES = "a uint8 RGB video of shape (T, H, W, 3) with T >= 1, or a list of (H, W, 3) frames"
DEMUXERS = "mov,matroska,avi,mpegts,mpeg,flv,ogg,asf"
"""The containers FFmpeg may open (`CONTAINERS`). Left open, FFmpeg also probes scripts and playlists (concat, hls, ...): a few bytes of
`ffconcat` make it decode another video file from the directory of the one it was given."""
CONTAINERS = "mp4/mov/3gp, mkv/webm, avi, ts, mpeg-ps, flv, ogg, wmv"
"""`DEMUXERS` as file types, for error messages."""
DECODERS = {
    "pyav": "PyAV, frames uniform in presentation time, decoding planned by keyframes (the default)",
    "opencv": "OpenCV's FFmpeg, frames uniform in frame index, decoding forward up to the last one "
              "(as vLLM's own loader); cannot read a live-stream WebM (it needs the frame count in the header)",
}


def _restrict_opencv_demuxers() -> None:
    """OpenCV passes OPENCV_FFMPEG_CAPTURE_OPTIONS to FFmpeg at every open. Set once, at import,
    before any decoding thread runs (setenv racing getenv can crash); an operator's own
    format_whitelist is kept."""
    options = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
    if "format_whitelist" not in options:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(filter(None, [options, f"format_whitelist;{DEMUXERS}"]))


_restrict_opencv_demuxers()


@dataclass(frozen=True)
class VideoLimits:
    """What decoding one untrusted video may cost (defaults: `intp-vllm serve`'s). Decoded frames
    never exceed `decoded_bytes_bound` (max_frames x max_frame_pixels x 3 bytes: 380 MiB at
    the defaults; with preprocessing, max_frames x crop^2 x 3 plus one frame), however long
    the video."""

    max_frames: int = 64
    max_frame_pixels: int = 1920 * 1080
    max_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_frame_pixels", "max_bytes"):
            check_positive_int(f"video limit {name}", getattr(self, name))

    @property
    def decoded_bytes_bound(self) -> int:
        return self.max_frames * self.max_frame_pixels * 3

    def check_num_frames(self, num_frames) -> None:
        integer = isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool)
        if not integer or not 1 <= num_frames <= self.max_frames:
            raise ValueError(f"num_frames={num_frames!r}: expected an integer from 1 to {self.max_frames}, "
                             "the most frames decoded from one video")

    def check_size(self, size: int, label: str) -> None:
        if size > self.max_bytes:
            raise ValueError(f"{label} is {size} bytes; at most {self.max_bytes} bytes of video are allowed")

    def check_frame_size(self, width: int, height: int, label: str) -> None:
        if width * height > self.max_frame_pixels:
            raise ValueError(f"{label} has {width}x{height} frames ({width * height} pixels); at most "
                             f"{self.max_frame_pixels} pixels a frame are allowed")


@dataclass(frozen=True)
class SampledVideo:
    """Decoded frames with where they came from (vLLM's loaders report the same).

    frames: uint8 (T, H, W, 3) RGB, or (T, crop, crop, 3) when decoded with preprocessing.
    indices: each frame's index in presentation order. timestamps: each frame's time in
    seconds from the first frame. total_frames: frames in the video. fps: frames per second
    (the stream's average rate). decoded_frames: frames the decoder produced to get these
    (the cost: at most total_frames for PyAV, as no frame is decoded twice; 0 for OpenCV, which
    does not report it).
    """

    frames: np.ndarray
    indices: list[int]
    total_frames: int
    fps: float
    timestamps: list[float] = field(default_factory=list)
    decoded_frames: int = 0


def as_frames(video, name: str = "video") -> np.ndarray:
    """Return `video` as a uint8 (T, H, W, 3) array, or raise naming what was received."""
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError(f"{name} has zero frames; expected {EXPECTED_FRAMES}")
        frames = [np.asarray(frame) for frame in video]
        shapes = {frame.shape for frame in frames}
        if len(shapes) != 1:
            raise ValueError(f"{name} frames differ in shape {sorted(shapes)}; expected {EXPECTED_FRAMES}")
        array = np.stack(frames)
    elif hasattr(video, "numpy") and hasattr(video, "detach"):  # torch.Tensor
        array = video.detach().cpu().numpy()
    elif isinstance(video, np.ndarray):
        array = video
    else:
        raise ValueError(f"{name} is a {type(video).__name__}; expected {EXPECTED_FRAMES}")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {EXPECTED_FRAMES}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} has zero frames; expected {EXPECTED_FRAMES}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {array.dtype}; expected {EXPECTED_FRAMES}")
    return array


def read_video(source: str | os.PathLike | bytes, num_frames: int, limits: VideoLimits | None = None, *,
               decoder: str = "pyav", preprocess: ClipPreprocessConfig | None = None, fps: float | None = None,
               start: float | str | None = None, end: float | str | None = None) -> np.ndarray:
    """Decode `num_frames` frames sampled uniformly over the whole video (fewer if it is shorter).

    `source` is a path or the file's bytes. Returns uint8 (T, H, W, 3) RGB. See `sample_video`.
    """
    return sample_video(source, num_frames, limits, decoder=decoder, preprocess=preprocess, fps=fps,
                        start=start, end=end).frames


def sample_video(source: str | os.PathLike | bytes, num_frames: int, limits: VideoLimits | None = None, *,
                 decoder: str = "pyav", preprocess: ClipPreprocessConfig | None = None, fps: float | None = None,
                 start: float | str | None = None, end: float | str | None = None) -> SampledVideo:
    """`read_video` with the sampled indices, timestamps, frame count and fps.

    fps: sample by rate instead, span x fps frames (`core.frame_plan`), `num_frames` then being
    the cap. start/end: seconds from the first frame (or `frame_plan.TIME_FORMAT` strings):
    sample only that span, decoding nothing after it (and before it, only from the keyframe
    its first frame needs); a start at or past the end of the video is a ValueError, found
    before any frame is decoded.
    decoder: a key of `DECODERS`. preprocess: resize and crop each frame as it is decoded
    (frames come back (T, crop, crop, 3)); frames with an aspect ratio above
    `preprocess.MAX_ASPECT_RATIO` are then refused before decoding.
    With `limits` (untrusted input) these are rejected before any frame is decoded: more
    than `max_bytes` of input, `num_frames` outside 1..`max_frames`, frames of more than
    `max_frame_pixels`. Without, it decodes what a trusted caller asks for; memory still
    holds only the sampled frames. Raises ValueError naming the input for anything that is
    not a decodable video.
    """
    if decoder not in DECODERS:
        raise ValueError(f"video decoder {decoder!r} is not one of {sorted(DECODERS)}")
    if limits:
        limits.check_num_frames(num_frames)
    else:
        uniform_frame_indices(1, num_frames)  # validates num_frames
    request = FrameRequest.from_kwargs({"fps": fps, "start": start, "end": end}, default_frames=num_frames,
                                       limit=num_frames, prefix="")
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = f"video bytes ({len(source)} bytes)"
        if limits:
            limits.check_size(len(source), "video bytes")
    else:
        path = Path(source)
        label = f"video file {str(path)!r}"
        if not path.is_file():
            raise ValueError(f"{label} does not exist")
        if limits:
            limits.check_size(path.stat().st_size, label)
    sample = _sample_pyav if decoder == "pyav" else _sample_opencv
    return sample(source, request, _FrameCheck(limits, preprocess, label))


@dataclass(frozen=True)
class _FrameCheck:
    """Limits on frame sizes and the per-frame transform, shared by both decoders."""

    limits: VideoLimits | None
    preprocess: ClipPreprocessConfig | None
    label: str

    def header(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.label} reports a frame size of {width}x{height}; it is not a decodable video")
        if self.limits:
            self.limits.check_frame_size(width, height, self.label)
        if self.preprocess:
            check_aspect_ratio(width, height, self.label)

    def frame(self, width: int, height: int, index: int) -> None:
        """A decoded frame's size: the header's promise may be broken mid-stream."""
        try:
            self.header(width, height)
        except ValueError as exc:
            raise ValueError(f"frame {index}: {exc}") from None

    def finish(self, rgb: np.ndarray, rotation: int) -> np.ndarray:
        """A decoded uint8 (H, W, 3) RGB frame -> the frame handed on: cropped when
        preprocessing, else full size; display `rotation` applied either way."""
        if self.preprocess:
            return resize_and_crop(rgb, self.preprocess, rotation)
        return np.asarray(rotate(Image.fromarray(rgb), rotation)) if rotation else rgb

    def frames(self, capacity: int) -> "_FrameStack":
        return _FrameStack(capacity, self.label)

    def video(self, frames: "_FrameStack", indices: list[int], total: int, fps: float,
              timestamps: list[float], decoded: int) -> SampledVideo:
        """The decoded frames as a SampledVideo; ValueError when there are none."""
        if not len(frames):
            raise ValueError(f"{self.label} has no decodable frames")
        return SampledVideo(frames.array[: len(frames)], indices, total, fps, timestamps, decoded)


class _FrameStack:
    """Frames written as they are decoded into one (capacity, H, W, 3) array, allocated at the
    first frame: the output is never copied a second time. Raises ValueError naming `label`
    when a frame's size differs from the first's."""

    def __init__(self, capacity: int, label: str) -> None:
        self.capacity, self.label = capacity, label
        self.array: np.ndarray | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, frame: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.capacity, *frame.shape), np.uint8)
        elif frame.shape != self.array.shape[1:]:
            first = self.array.shape[1:3]
            raise ValueError(f"{self.label} changes frame size mid-stream ({first[1]}x{first[0]} and "
                             f"{frame.shape[1]}x{frame.shape[0]}); decode it with preprocessing to resize every frame")
        self.array[self.count] = frame
        self.count += 1


# ------------------------------------------------------------------------------------- PyAV


def _open_pyav(source, label: str):
    import av

    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    try:
        return av.open(file, "r", container_options={"format_whitelist": DEMUXERS}), file
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        file.close()
        raise ValueError(f"{label} is not a video PyAV can open ({_reason(exc)}): expected a video file "
                         f"({CONTAINERS})") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass
class _PacketIndex:
    """Every video packet's presentation timestamp (stream time base), in presentation order,
    and the keyframes' timestamps: the sampling plan's input. `predicted`: read off the
    container's sample table (`_table_index`) rather than demuxed, so the decoder checks every
    frame it decodes against it (`_IndexMismatch`)."""

    pts: np.ndarray
    keyframes: np.ndarray
    predicted: bool = False


class _IndexMismatch(Exception):
    """A decoded frame contradicts a predicted `_PacketIndex`: plan again from a demuxing pass."""


_AVINDEX_KEYFRAME, _AVINDEX_DISCARD_FRAME = 1, 2
"""FFmpeg's AVIndexEntry flags (libavformat/avformat.h)."""


def _table_index(container, stream) -> _PacketIndex | None:
    """The packet index from an MP4/MOV sample table, without the demuxing pass (which costs
    ~6 us a packet in PyAV: 0.6 s of CPU for an hour at 30 fps, more than seeking to 32 frames
    of it): only where the table's decode timestamps are evenly spaced (a constant frame rate),
    no sample is cut by an edit list and the stream states as many frames, in H.264 (whose
    keyframes, IDR pictures, have no frames shown before them that follow them in decoding
    order; HEVC's open GOPs do, so a keyframe's pts is not its dts shifted). The presentation
    timestamps are then those decode timestamps shifted by the first packet's pts - dts (the
    decoder's reorder delay: the stream's start time less the first decode timestamp),
    keyframes likewise. None otherwise, or when the table is absent (other containers: their
    index holds keyframes only). Reads no packet."""
    if not set(container.format.name.split(",")) & {"mov", "mp4"} or stream.codec_context.name != "h264":
        return None
    entries = stream.index_entries
    total = len(entries)
    if total < 2 or total != stream.frames:
        return None
    table = np.fromiter(chain.from_iterable((entry.timestamp, entry.flags) for entry in entries), np.int64,
                        2 * total).reshape(total, 2)  # one pass over the table
    dts, flags = table[:, 0], table[:, 1]
    step = int(dts[1] - dts[0])
    if step <= 0 or np.any(np.diff(dts) != step) or np.any(flags & _AVINDEX_DISCARD_FRAME):
        return None
    if stream.start_time is None or stream.start_time < dts[0]:
        return None
    delay = int(stream.start_time - dts[0])
    return _PacketIndex(dts + delay, dts[(flags & _AVINDEX_KEYFRAME) > 0] + delay, predicted=True)


def _index_packets(container, stream) -> _PacketIndex | None:
    """One demuxing pass (no decoding). None when a packet has no timestamp (then frames are
    counted by decoding)."""
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    return _PacketIndex(np.sort(np.asarray(pts, dtype=np.int64)), np.sort(np.asarray(keyframes, dtype=np.int64)))


def uniform_time_targets(pts: np.ndarray, num_frames: int) -> np.ndarray:
    """Indices into presentation-ordered timestamps `pts` (integers, one time base): `num_frames`
    frames spread uniformly in time over the whole video, first and last frame included; all
    frames when the video has at most `num_frames`.

    At a constant frame rate (every interval within one tick of the mean interval, as when
    a 30 fps video is stored in milliseconds) this is `uniform_frame_indices`, exactly.
    Otherwise (variable frame rate) target i is the last frame shown at or before the instant
    first + i (last - first) / (num_frames - 1); a frame shown for long may be chosen twice.
    """
    total = len(pts)
    if num_frames >= total or num_frames == 1:
        return uniform_frame_indices(total, num_frames)
    first, span = int(pts[0]), int(pts[-1]) - int(pts[0])
    if np.all(np.abs(np.diff(pts) * (total - 1) - span) <= total - 1):
        return uniform_frame_indices(total, num_frames)
    instants = [first + span * i // (num_frames - 1) for i in range(num_frames)]
    return np.searchsorted(pts, np.asarray(instants, dtype=np.int64), side="right") - 1


def span_targets(pts: np.ndarray, tick_seconds: float, request: FrameRequest, rate: float, label: str) -> np.ndarray:
    """Indices into presentation-ordered timestamps `pts` (integer ticks of `tick_seconds`) of
    the frames `request` asks for: its count (or span x fps) spread uniformly in time
    (`uniform_time_targets`) over its span, from the frame shown at `start` to the last frame
    shown before `end`. `rate`: frames a second, the duration of a one-frame video (0: unknown).
    Raises ValueError when the span starts at or past the end of the video."""
    if request.whole_video:
        return uniform_time_targets(pts, request.cap)
    total = len(pts)
    if total > 1:
        duration = (int(pts[-1]) - int(pts[0])) * tick_seconds * total / (total - 1)
    else:
        duration = 1 / rate if rate else 0.0
    plan = request.plan(duration, label)
    first = int(pts[0])
    lo = max(int(np.searchsorted(pts, first + math.floor(plan.start / tick_seconds + 1e-6), side="right")) - 1, 0)
    hi = total if plan.end >= duration else int(
        np.searchsorted(pts, first + math.ceil(plan.end / tick_seconds - 1e-6), side="left"))
    hi = max(hi, lo + 1)
    return lo + uniform_time_targets(pts[lo:hi], plan.count)


def _plan_input(source, check: _FrameCheck, from_table: bool):
    """(packet index or None, time base, frame rate) of the first video stream, checked against
    the limits: the index from the sample table where `from_table` and `_table_index` allow,
    else from one demuxing pass (None when packets carry no timestamps)."""
    import av

    container, file = _open_pyav(source, check.label)
    try:
        if not container.streams.video:
            raise ValueError(f"{check.label} has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise ValueError(f"{check.label} holds a video stream in a codec PyAV cannot decode")
        check.header(stream.codec_context.width, stream.codec_context.height)
        index = _table_index(container, stream) if from_table else None
        if index is None:
            index = _index_packets(container, stream)
        if index is not None and not len(index.pts):
            raise ValueError(f"{check.label} has no video frames")
        return index, stream.time_base or Fraction(1, 1), stream.average_rate or stream.guessed_rate
    except av.FFmpegError as exc:
        raise ValueError(f"{check.label} failed to decode: {_reason(exc)}") from None
    finally:
        container.close()
        file.close()


def _sample_pyav(source, request: FrameRequest, check: _FrameCheck, from_table: bool = True) -> SampledVideo:
    """`from_table`: plan from the sample table where it allows (`_table_index`); a decoded frame
    that contradicts it plans again from a demuxing pass (the frames decoded so far count)."""
    import av

    index, time_base, rate = _plan_input(source, check, from_table)
    # The plan is made, and a range past the end refused, before a decoder is opened.
    wanted = None if index is None else span_targets(index.pts, float(time_base), request, float(rate or 0),
                                                     check.label)
    seconds_per_frame = None if index is not None else 1 / _known_rate(rate, request, check.label)
    decoder = _PlannedDecoder(source, check)
    try:
        if index is None:
            frames, indices = decoder.decode_counting(
                lambda counted: span_targets(np.arange(counted), seconds_per_frame, request, float(rate or 0),
                                             check.label))
            total, seconds = decoder.counted, [i / float(rate) if rate else 0.0 for i in indices]
        else:
            frames, stamps = decoder.decode_planned(index, index.pts[wanted])
            indices, total = wanted.tolist()[: len(frames)], len(index.pts)
            seconds = [float((stamp - int(index.pts[0])) * time_base) for stamp in stamps]
    except _IndexMismatch:
        mismatch = True
    except av.FFmpegError as exc:
        raise ValueError(f"{check.label} failed to decode: {_reason(exc)}") from None
    else:
        mismatch = False
    finally:
        decoder.close()
    if mismatch:
        video = _sample_pyav(source, request, check, from_table=False)
        return replace(video, decoded_frames=video.decoded_frames + decoder.decoded)
    return check.video(frames, indices, total, float(rate) if rate else 0.0, seconds, decoder.decoded)


class _PlannedDecoder:
    """Decodes sampled frames from a fresh container, seeking only where it saves decoding."""

    def __init__(self, source, check: _FrameCheck) -> None:
        self.source, self.check = source, check
        self.counted = self.decoded = 0
        self._open()

    def _open(self) -> None:
        self.container, self.file = _open_pyav(self.source, self.check.label)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads
        self.frames = self.container.decode(self.stream)

    def close(self) -> None:
        self.container.close()
        self.file.close()

    def _take(self, frame, index: int) -> np.ndarray:
        self.check.frame(frame.width, frame.height, index)
        return self.check.finish(frame.to_ndarray(format="rgb24"), _rotation(frame))

    def decode_planned(self, index: _PacketIndex, targets: np.ndarray) -> tuple["_FrameStack", list[int]]:
        """The frames with presentation timestamps `targets` (sorted, repeats allowed) and their pts.

        `position` is the pts of the last frame decoded (at the start: the first frame's, as
        the decoder starts there). Before each target, it seeks to the target's keyframe
        only when that keyframe comes after `position` and after the last seek, so no
        keyframe is sought twice. A seek that lands after its target, or before where
        decoding already was (a container without a usable index), turns seeking off: the
        first case restarts from the beginning, the second decodes on from where it landed.
        A target whose frame the decoder never shows (a corrupt packet) takes the next frame
        shown; a stream that ends early gives the frames so far. Raises ValueError when the
        decoder yields more frames than two passes over the packets (a corrupt stream), and
        `_IndexMismatch` when `index` is predicted and a decoded frame is off its timestamps
        (not on its grid, a target not shown exactly, no timestamp, or the stream ending early).
        """
        frames, stamps = self.check.frames(len(targets)), []
        position = last_seek = int(index.pts[0])
        seeking, just_sought = len(index.keyframes) > 0, False
        budget = 2 * len(index.pts) + 16
        if index.predicted:  # evenly spaced, `_table_index`
            first, step, total = int(index.pts[0]), int(index.pts[1] - index.pts[0]), len(index.pts)
        i, target, keyframe = 0, None, None
        while i < len(targets):
            if target != int(targets[i]):
                target = int(targets[i])
                if seeking:  # the keyframe before the target, looked up once a target
                    keyframe = int(index.keyframes[max(np.searchsorted(index.keyframes, target, side="right") - 1, 0)])
            if seeking:
                if keyframe > position and keyframe > last_seek:
                    self.container.seek(keyframe, stream=self.stream, backward=True, any_frame=False)
                    self.frames = self.container.decode(self.stream)
                    just_sought, last_seek, before_seek = True, keyframe, position
            frame = next(self.frames, None)
            if frame is None:
                if index.predicted:
                    raise _IndexMismatch
                break
            self.decoded += 1
            if self.decoded > budget:
                raise ValueError(f"{self.check.label} is corrupt: its decoder yields more frames than the "
                                 f"{len(index.pts)} packets of the stream hold")
            if index.predicted and (frame.pts is None or (frame.pts - first) % step
                                    or not 0 <= (frame.pts - first) // step < total):
                raise _IndexMismatch
            if frame.pts is None:
                continue
            if just_sought:
                just_sought = False
                if frame.pts > target:
                    self.close()
                    self._open()
                    position, seeking = int(index.pts[0]), False
                    continue
                if frame.pts < before_seek:
                    seeking = False
            position = frame.pts
            if frame.pts < target:
                continue
            if index.predicted and frame.pts != target:
                raise _IndexMismatch
            image = self._take(frame, len(stamps))
            while i < len(targets) and int(targets[i]) <= frame.pts:
                frames.append(image)
                stamps.append(frame.pts)
                i += 1
        return frames, stamps

    def decode_counting(self, choose) -> tuple["_FrameStack", list[int]]:
        """Streams whose packets carry no timestamps: count frames by decoding once (keeping
        none), then decode again up to the last of `choose(frame count)` (indices)."""
        self.counted = sum(1 for _ in self.frames)
        if self.counted == 0:
            raise ValueError(f"{self.check.label} has no video frames")
        wanted = set(choose(self.counted).tolist())
        self.close()
        self._open()
        frames, indices, last = self.check.frames(len(wanted)), [], max(wanted)
        self.decoded = self.counted
        for position, frame in enumerate(self.frames):
            self.decoded += 1
            if position > last:
                break
            if position in wanted:
                frames.append(self._take(frame, position))
                indices.append(position)
        return frames, indices


def _known_rate(rate, request: FrameRequest, label: str) -> float:
    """The stream's frame rate; ValueError when it states none and `request` needs it (a rate or a range)."""
    if not rate and not request.whole_video:
        raise ValueError(f"{label} states no frame rate, so it cannot be sampled by fps or a time range; "
                         "ask for a frame count over the whole video")
    return float(rate or 1)


def _rotation(frame) -> int:
    """A frame's display rotation as 0, 90, 180 or 270 degrees counter-clockwise."""
    return int(round((frame.rotation or 0) / 90)) % 4 * 90


# ------------------------------------------------------------------------------------ OpenCV


def _sample_opencv(source, request: FrameRequest, check: _FrameCheck) -> SampledVideo:
    if isinstance(source, (bytes, bytearray, memoryview)):
        # Bytes go through a file, not OpenCV's in-memory stream reader: that reader
        # segfaults on some malformed mp4 headers (tests/test_robustness.py has one).
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(source)
            tmp.flush()
            return _sample_opencv_file(tmp.name, request, check)
    return _sample_opencv_file(str(source), request, check)


def _sample_opencv_file(path: str, request: FrameRequest, check: _FrameCheck) -> SampledVideo:
    import cv2

    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise ValueError(f"{check.label} is not a video OpenCV can open: expected a container and codec it "
                             "decodes (mp4, avi, mkv, webm, ...) holding at least one frame")
        check.header(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            raise ValueError(f"{check.label} has no video frames")
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        wanted = span_targets(np.arange(total), 1 / _known_rate(fps, request, check.label), request, fps,
                              check.label).tolist()
        frames, indices, position = check.frames(len(wanted)), [], 0
        for index in wanted:
            while position < index and capture.grab():  # forward, as vLLM's loader: no seek re-decodes a GOP
                position += 1
            ok, frame = capture.read()
            if position < index or not ok or frame is None:
                break  # the frame count was an estimate: keep the frames so far
            check.frame(frame.shape[1], frame.shape[0], index)
            frames.append(check.finish(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), 0))
            indices.append(index)
            position = index + 1
    except cv2.error as exc:
        raise ValueError(f"{check.label} failed to decode: {exc}") from None
    finally:
        capture.release()
    return check.video(frames, indices, total, fps, [i / fps if fps > 0 else 0.0 for i in indices], decoded=0)


# ------------------------------------------------------------------------------------ writing


WRITE_CODECS = {".mp4": "libx264", ".mkv": "ffv1", ".webm": "libvpx-vp9", ".avi": "mjpeg"}
"""Default codec by extension (ffv1 is lossless)."""


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, *, codec: str | None = None,
                gop: int | None = None, b_frames: int | None = None, pix_fmt: str | None = None,
                options: dict | None = None, rotation: int = 0, timestamps: list[float] | None = None,
                container_options: dict | None = None) -> Path:
    """Write uint8 RGB frames (T, H, W, 3) with PyAV, as tests, benchmarks and the demo need real files.

    codec: any PyAV encoder (default from the extension, `WRITE_CODECS`); gop: keyframe
    interval in frames; b_frames: most consecutive B-frames; pix_fmt: default yuv420p
    (yuv444p for odd sizes, gray stays gray with "gray"); options: encoder options
    (e.g. {"preset": "veryfast", "crf": "23"}); rotation: display rotation in degrees
    counter-clockwise, stored as metadata; timestamps: each frame's presentation time in
    seconds, increasing (a variable frame rate; default k / fps, millisecond precision
    when given); container_options: muxer options (e.g. {"live": "1"} writes a WebM as a
    live stream: no duration, no cues). Raises ValueError for an unknown extension or
    timestamps that do not increase, one per frame.
    """
    import av

    frames = as_frames(frames)
    path = Path(path)
    codec = codec or WRITE_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"cannot write {str(path)!r}: the extension must be one of {', '.join(WRITE_CODECS)} "
                         "or a codec must be given")
    height, width = frames.shape[1:3]
    if pix_fmt is None:
        pix_fmt = {"ffv1": "bgr0", "mjpeg": "yuvj444p"}.get(codec, "yuv420p" if height % 2 == width % 2 == 0
                                                           else "yuv444p")
    if timestamps is not None and (len(timestamps) != len(frames) or np.any(np.diff(timestamps) <= 0)):
        raise ValueError(f"timestamps must increase, one per frame ({len(frames)}), got {len(timestamps)}")
    time_base = Fraction(1, 1000) if timestamps is not None else None
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if gop is not None:
            stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        if rotation:
            stream.set_display_rotation(rotation)
        for k, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if time_base is not None:
                picture.pts, picture.time_base = round(timestamps[k] / time_base), time_base
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path
