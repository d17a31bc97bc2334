"""TEMPORARY stand-in (lead) until the rearrangement module lands; same API."""
import numpy as np

def uniform_frame_indices(total_frames, num_frames):
    n = min(num_frames, total_frames)
    return np.linspace(0, total_frames - 1, n, dtype=int)

def padded_frame_count(num_frames, encoder_frames):
    return -(-num_frames // encoder_frames) * encoder_frames

def pad_frame_indices(num_frames, encoder_frames):
    idx = np.arange(padded_frame_count(num_frames, encoder_frames))
    return np.minimum(idx, num_frames - 1)

def interleaved_groups(num_frames, encoder_frames):
    k = num_frames // encoder_frames
    return np.arange(num_frames).reshape(encoder_frames, k).T

def consecutive_groups(num_frames, encoder_frames):
    return np.arange(num_frames).reshape(-1, encoder_frames)

def time_order_permutation(groups):
    return np.argsort(groups.ravel(), kind="stable")

def token_permutation(groups, tokens_per_frame):
    perm = time_order_permutation(groups)
    return (perm[:, None] * tokens_per_frame + np.arange(tokens_per_frame)[None]).ravel()

GROUPINGS = {"interleaved": interleaved_groups, "consecutive": consecutive_groups}
