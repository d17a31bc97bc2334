"""Run a frozen N-frame video encoder over F = K*N frames, INTP style.

The frames are split into K groups (interleaved by default: group j = frames j, j+K, ...),
each group goes through the encoder as an ordinary N-frame clip, and the tokens come back
in frame-time order, as the language model expects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from intp_vllm.core.rearrange import GROUPINGS, token_permutation

ClipEncoder = Callable[[torch.Tensor], torch.Tensor]
"""(K, N, C, H, W) clips -> (K, N, tokens_per_frame, hidden) tokens."""


def encode_in_groups(pixels: torch.Tensor, encode_clips: ClipEncoder, encoder_frames: int,
                     grouping: str = "interleaved") -> torch.Tensor:
    """(F, C, H, W) frames, F a multiple of N -> (F * tokens_per_frame, hidden) in frame-time order."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    groups = GROUPINGS[grouping](pixels.shape[0], encoder_frames)
    index = torch.from_numpy(groups.ravel()).to(pixels.device)
    tokens = encode_clips(pixels[index].unflatten(0, groups.shape))
    if tokens.shape[:2] != groups.shape:
        raise ValueError(f"encoder returned shape {tuple(tokens.shape)}; expected {groups.shape} clips x frames first")
    order = torch.from_numpy(token_permutation(groups, tokens.shape[2])).to(tokens.device)
    return tokens.flatten(0, 2)[order]
