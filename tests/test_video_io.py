"""Decoding real mp4 files written with OpenCV; validation of frame arrays."""

from __future__ import annotations

import numpy as np
import pytest

from intp_vllm.rearrange import uniform_frame_indices
from intp_vllm.video_io import as_frames, read_video, write_video


BITS = 6


def numbered_video(num_frames: int) -> np.ndarray:
    """Frame i shows i in binary as 6 black/white blocks: survives lossy mp4 coding."""
    video = np.zeros((num_frames, 32, 8 * BITS, 3), np.uint8)
    for i in range(num_frames):
        for bit in range(BITS):
            if i >> bit & 1:
                video[i, :, 8 * bit : 8 * bit + 8] = 255
    return video


def decoded_indices(frames: np.ndarray) -> list[int]:
    blocks = frames.reshape(len(frames), 32, BITS, 8, 3).mean(axis=(1, 3, 4)) > 128
    return [int(sum(1 << bit for bit in range(BITS) if row[bit])) for row in blocks]


def test_reads_only_uniformly_sampled_frames(tmp_path):
    path = write_video(tmp_path / "numbered.mp4", numbered_video(60))
    frames = read_video(path, 8)
    assert frames.shape == (8, 32, 48, 3) and frames.dtype == np.uint8
    assert decoded_indices(frames) == uniform_frame_indices(60, 8).tolist()


def test_bytes_and_path_give_the_same_frames(tmp_path):
    path = write_video(tmp_path / "numbered.mp4", numbered_video(20))
    np.testing.assert_array_equal(read_video(path.read_bytes(), 5), read_video(path, 5))


def test_shorter_video_returns_all_its_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", numbered_video(3))
    assert decoded_indices(read_video(path, 8)) == [0, 1, 2]


def test_non_video_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 10)
    with pytest.raises(ValueError, match="notes.mp4.*not a video|notes.mp4.*no video frames"):
        read_video(path, 8)
    with pytest.raises(ValueError, match="does not exist"):
        read_video(tmp_path / "missing.mp4", 8)


def test_as_frames_accepts_arrays_lists_and_tensors():
    import torch

    video = numbered_video(4)
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
