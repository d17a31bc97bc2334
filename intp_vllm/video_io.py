"""Video input: validate frame arrays; decode only the sampled frames of a file or bytes with OpenCV.

Each sampled frame is reached by seeking, so memory holds only the sampled frames however
long the video. For untrusted input, `VideoLimits` caps the encoded size, the frames sampled
and the pixels per frame, checked before any frame is decoded. FFmpeg may open only real
containers (`DEMUXERS`). Every failure is a ValueError naming the input and what is allowed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .rearrange import uniform_frame_indices

EXPECTED_FRAMES = "a uint8 RGB video of shape (T, H, W, 3) with T >= 1, or a list of (H, W, 3) frames"
DEMUXERS = "mov,matroska,avi,mpegts,mpeg,flv,ogg,asf"
"""The containers FFmpeg may open: mp4/mov/3gp, mkv/webm, avi, ts, mpeg-ps, flv, ogg, wmv.
Left open, FFmpeg also probes scripts and playlists (concat, hls, ...): a few bytes of
`ffconcat` make it decode another video file from the directory of the one it was given."""


def _restrict_demuxers() -> None:
    """OpenCV passes OPENCV_FFMPEG_CAPTURE_OPTIONS to FFmpeg at every open. Set once, at import,
    before any decoding thread runs (setenv racing getenv can crash); an operator's own
    format_whitelist is kept."""
    options = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
    if "format_whitelist" not in options:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(filter(None, [options, f"format_whitelist;{DEMUXERS}"]))


_restrict_demuxers()


@dataclass(frozen=True)
class VideoLimits:
    """What decoding one untrusted video may cost (defaults: `intp-vllm serve`'s). Decoded frames
    never exceed `decoded_bytes_bound` (max_frames x max_frame_pixels x 3 bytes: 380 MiB at
    the defaults), however long the video."""

    max_frames: int = 64
    max_frame_pixels: int = 1920 * 1080
    max_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_frame_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"video limit {name} must be a positive integer, got {value!r}")

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
    """Decoded frames with where they came from (vLLM's loaders report the same)."""

    frames: np.ndarray
    indices: list[int]
    total_frames: int
    fps: float


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


def read_video(source: str | os.PathLike | bytes, num_frames: int, limits: VideoLimits | None = None) -> np.ndarray:
    """Decode `num_frames` frames sampled uniformly over the whole video (fewer if it is shorter).

    `source` is a path or the file's bytes. See `sample_video` for `limits`.
    """
    return sample_video(source, num_frames, limits).frames


def sample_video(source: str | os.PathLike | bytes, num_frames: int,
                 limits: VideoLimits | None = None) -> SampledVideo:
    """`read_video` with the sampled indices, frame count and fps.

    With `limits` (untrusted input) these are rejected before any frame is decoded: more
    than `max_bytes` of input, `num_frames` outside 1..`max_frames`, frames of more than
    `max_frame_pixels`. Without, it decodes what a trusted caller asks for; memory still
    holds only the sampled frames.
    """
    if limits:
        limits.check_num_frames(num_frames)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if limits:
            limits.check_size(len(source), "video bytes")
        # Bytes go through a file, not OpenCV's in-memory stream reader: that reader
        # segfaults on some malformed mp4 headers (tests/test_robustness.py has one).
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(source)
            tmp.flush()
            return _sample(tmp.name, num_frames, limits, label=f"video bytes ({len(source)} bytes)")
    path = Path(source)
    label = f"video file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{label} does not exist")
    if limits:
        limits.check_size(path.stat().st_size, label)
    return _sample(str(path), num_frames, limits, label)


def _sample(path: str, num_frames: int, limits: VideoLimits | None, label: str) -> SampledVideo:
    import cv2

    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise ValueError(f"{label} is not a video OpenCV can open: expected a container and codec it "
                             "decodes (mp4, avi, mkv, webm, ...) holding at least one frame")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width <= 0 or height <= 0:
            raise ValueError(f"{label} reports a frame size of {width}x{height}; it is not a decodable video")
        if limits:
            limits.check_frame_size(width, height, label)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            raise ValueError(f"{label} has no video frames")
        frames, indices = _read_frames(capture, uniform_frame_indices(total, num_frames), width * height)
        fps = float(capture.get(cv2.CAP_PROP_FPS))
    except cv2.error as exc:
        raise ValueError(f"{label} failed to decode: {exc}") from None
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"{label} has no decodable frames")
    return SampledVideo(np.stack(frames), indices, total, fps)


def _read_frames(capture, wanted: np.ndarray, pixels: int) -> tuple[list[np.ndarray], list[int]]:
    """Seek to each wanted frame: memory holds only the sampled frames, time does not grow with length.

    Stops at the first frame that fails to decode or whose size differs from the header's
    (rotation may swap width and height, nothing may add pixels): the frames so far are kept.
    """
    import cv2

    frames, indices, position = [], [], 0
    for index in wanted.tolist():
        if index != position:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = capture.read()
        if not ok or frame is None or frame.shape[0] * frame.shape[1] != pixels or (
                frames and frame.shape != frames[0].shape):
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        indices.append(index)
        position = index + 1
    return frames, indices


WRITE_CODECS = {".mp4": "mp4v", ".mkv": "FFV1", ".avi": "MJPG"}  # FFV1 is lossless


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write RGB frames with the codec of the file's extension, as tests and the demo need real files."""
    import cv2

    frames = as_frames(frames)
    path = Path(path)
    codec = WRITE_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"cannot write {str(path)!r}: the extension must be one of {', '.join(WRITE_CODECS)}")
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write {codec} to {str(path)!r}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
