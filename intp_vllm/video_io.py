"""Video input: validate frame arrays, decode only the sampled frames of a file with OpenCV."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .rearrange import uniform_frame_indices

EXPECTED_FRAMES = "a uint8 RGB video of shape (T, H, W, 3) with T >= 1, or a list of (H, W, 3) frames"


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


def read_video(source: str | os.PathLike | bytes, num_frames: int) -> np.ndarray:
    """Decode `num_frames` frames sampled uniformly over the whole video (fewer if it is shorter).

    Seeks to each sampled frame instead of decoding the whole file, so memory is bounded
    by the sampled frames. `source` is a path or the file's bytes.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(bytes(source))
            tmp.flush()
            return _read_video_file(tmp.name, num_frames, label="video bytes")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"video file {str(path)!r} does not exist")
    return _read_video_file(str(path), num_frames, label=f"video file {str(path)!r}")


def _read_video_file(path: str, num_frames: int, label: str) -> np.ndarray:
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise ValueError(f"{label} is not a video OpenCV can decode")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            raise ValueError(f"{label} has no video frames")
        frames = []
        position = 0
        for index in uniform_frame_indices(total, num_frames):
            if index != position:
                capture.set(cv2.CAP_PROP_POS_FRAMES, int(index))
            ok, frame = capture.read()
            if not ok:
                break  # container over-reported its frame count
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            position = int(index) + 1
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"{label} has no decodable frames")
    return np.stack(frames)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write RGB frames as an mp4 (mp4v), as tests and the demo need real files."""
    import cv2

    frames = as_frames(frames)
    path = Path(path)
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write an mp4 to {str(path)!r}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
