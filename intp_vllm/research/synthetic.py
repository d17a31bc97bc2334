"""Synthetic videos, deterministic: moving coloured shapes (drawn with OpenCV), and index-coded
frames whose content names their index (for frame-exact decoding tests)."""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 60, 200),
    "cyan": (60, 210, 220),
}
"""The one palette of every synthetic video (the moving shapes, the needle tasks' colours,
which are also words of the needle model's vocabulary)."""


def moving_shapes_video(num_frames: int = 32, height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a red circle crossing left to right, a blue square bouncing, on noise."""
    import cv2

    if num_frames < 1 or height < 16 or width < 16:
        raise ValueError(f"need num_frames >= 1 and a frame of at least 16x16, got {num_frames}x{height}x{width}")
    rng = np.random.default_rng(seed)
    background = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    radius = max(4, min(height, width) // 8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        phase = t / max(num_frames - 1, 1)
        frame = background.copy()
        circle_x = int(radius + phase * (width - 2 * radius))
        cv2.circle(frame, (circle_x, height // 3), radius, COLOURS["red"], thickness=-1)
        square_y = int(radius + abs(np.sin(np.pi * 2 * phase)) * (height - 3 * radius))
        cv2.rectangle(frame, (width - 3 * radius, square_y), (width - radius, square_y + 2 * radius),
                      COLOURS["blue"], thickness=-1)
        frames[t] = frame
    return frames


INDEX_BITS = 12
"""Bits of the frame index that `index_coded_video` draws (frames 0..4095)."""


def index_coded_video(num_frames: int, height: int = 72, width: int = 96) -> np.ndarray:
    """(T, H, W, 3) uint8 whose frame k shows k in binary, so a decoder's frame choice can be read back.

    The frame is a 3 x 4 grid of blocks, bit b of k in block (b // 4, b % 4), white for 1 and
    black for 0, with a gradient drifting across it so that encoders see motion. The blocks
    survive lossy coding (H.264 at default quality, 4:2:0 chroma) at any size of 24 x 32 and up.
    Raises ValueError for more than 2**INDEX_BITS frames or a smaller frame.
    """
    if not 1 <= num_frames <= 1 << INDEX_BITS or height < 24 or width < 32:
        raise ValueError(f"need 1..{1 << INDEX_BITS} frames of at least 32x24, got {num_frames} of {width}x{height}")
    rows = np.arange(height) * 3 // height
    cols = np.arange(width) * 4 // width
    block = rows[:, None] * 4 + cols[None, :]
    ramp = (np.arange(width) * 64 // width).astype(np.int64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for k in range(num_frames):
        bits = (k >> block) & 1
        drift = (ramp + 4 * k) % 64
        frames[k] = np.where(bits == 1, 191 + drift, drift)[..., None].astype(np.uint8)
    return frames


def decode_frame_index(frames: np.ndarray) -> list[int]:
    """The index each frame of an `index_coded_video` shows (after any decoding), one per frame."""
    frames = np.asarray(frames)
    height, width = frames.shape[1:3]
    rows = np.arange(height) * 3 // height
    cols = np.arange(width) * 4 // width
    block = (rows[:, None] * 4 + cols[None, :]).ravel()
    luma = frames.mean(axis=-1).reshape(len(frames), -1)
    counts = np.bincount(block, minlength=INDEX_BITS)
    means = np.stack([np.bincount(block, weights=row, minlength=INDEX_BITS) / counts for row in luma])
    return [int(sum(1 << b for b in range(INDEX_BITS) if mean[b] > 127)) for mean in means]
