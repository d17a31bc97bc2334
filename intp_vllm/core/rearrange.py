"""Frame sampling and INTP's video-token rearrangement, as pure numpy functions.

A frozen encoder trained on N-frame clips reads F = K * N frames as K clips. With
*interleaved* groups (the INTP paper) group j holds frames j, j+K, j+2K, ..., so every
clip spans the whole video at K times the stride; *consecutive* groups (plain chunking)
give each clip one K-th of the video. Either way the encoder's output is put back in
frame-time order before it reaches the language model.

Frame counts that are not a multiple of N (fewer than N included) are padded by
repeating the last frame up to the next multiple of N: the encoder always sees whole
N-frame clips, and a repeated frame carries no new information.
"""

from __future__ import annotations

import numpy as np

from intp_vllm.core.checks import check_positive_int


def uniform_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread over the whole video, first and last frame included
    (vLLM's OpenCV loader convention); all frames when the video is shorter."""
    check_positive_int("total_frames", total_frames)
    check_positive_int("num_frames", num_frames)
    return np.linspace(0, total_frames - 1, min(num_frames, total_frames), dtype=int)


def padded_frame_count(num_frames: int, encoder_frames: int) -> int:
    """`num_frames` rounded up to a multiple of the encoder window N."""
    check_positive_int("num_frames", num_frames)
    check_positive_int("encoder_frames", encoder_frames)
    return -(-num_frames // encoder_frames) * encoder_frames


def pad_frame_indices(num_frames: int, encoder_frames: int) -> np.ndarray:
    """Indices into `num_frames` frames that repeat the last one up to a multiple of N."""
    return np.minimum(np.arange(padded_frame_count(num_frames, encoder_frames)), num_frames - 1)


def _group_shape(num_frames: int, encoder_frames: int) -> tuple[int, int]:
    check_positive_int("num_frames", num_frames)
    check_positive_int("encoder_frames", encoder_frames)
    if num_frames % encoder_frames:
        raise ValueError(
            f"num_frames ({num_frames}) must be a multiple of encoder_frames ({encoder_frames}); "
            "pad with pad_frame_indices first"
        )
    return num_frames // encoder_frames, encoder_frames


def interleaved_groups(num_frames: int, encoder_frames: int) -> np.ndarray:
    """(K, N) frame indices; group j = frames j, j+K, j+2K, ... (each spans the whole video)."""
    k, n = _group_shape(num_frames, encoder_frames)
    return np.arange(num_frames).reshape(n, k).T.copy()


def consecutive_groups(num_frames: int, encoder_frames: int) -> np.ndarray:
    """(K, N) frame indices; group j = frames jN .. jN+N-1 (plain chunking, the baseline)."""
    k, n = _group_shape(num_frames, encoder_frames)
    return np.arange(num_frames).reshape(k, n)


def time_order_permutation(groups: np.ndarray) -> np.ndarray:
    """`perm` with `encoded[perm]` in frame-time order, for rows encoded group by group."""
    flat = np.asarray(groups).ravel()
    if not np.array_equal(np.sort(flat), np.arange(flat.size)):
        raise ValueError("groups must hold every frame index 0..F-1 exactly once")
    return np.argsort(flat, kind="stable")


GROUPINGS = {"interleaved": interleaved_groups, "consecutive": consecutive_groups}
