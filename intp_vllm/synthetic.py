"""Synthetic videos drawn with OpenCV: moving coloured shapes, deterministic per seed."""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
}


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
