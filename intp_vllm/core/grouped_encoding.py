"""Run a frozen N-frame video encoder over F = K*N frames, INTP style, in chunks.

The frames are split into K groups (interleaved by default: group j = frames j, j+K, ...),
each group goes through the encoder as an ordinary N-frame clip, and the tokens come back
in frame-time order, as the language model expects.

The encoder sees at most `chunk_frames` frames a call (whole clips; ENCODER_CHUNK_FRAMES by
default), and each chunk's tokens are written straight to their frame-time rows of the output:
besides the output (F x tokens_per_frame x hidden) and the request's pixels, peak memory is
one chunk's pixels and activations, whatever F. A clip's tokens depend only on that clip, so
the result equals one call over all clips (tested bit for bit). `encoded_chunks` hands each
chunk's tokens on as they are ready (pruning consumes them so: vllm_ext/pruning.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from intp_vllm.core.checks import check_positive_int
from intp_vllm.core.rearrange import GROUPINGS, time_order_permutation

ClipEncoder = Callable[[torch.Tensor], torch.Tensor]
"""(K, N, C, H, W) clips -> (K, N, tokens_per_frame, hidden) tokens."""
ENCODER_CHUNK_FRAMES = 64
"""Frames one encoder call sees at most (rounded down to whole clips, at least one clip)."""


def encoded_chunks(pixels: torch.Tensor, encode_clips: ClipEncoder, encoder_frames: int,
                   grouping: str = "interleaved",
                   chunk_frames: int = ENCODER_CHUNK_FRAMES) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(F, C, H, W) frames, F a multiple of N -> per encoder call, (frame indices (n,) int64, tokens
    (n, tokens_per_frame, hidden)): the frames of `chunk_frames // N` clips (at least one), as the
    encoder saw them, each frame's tokens beside its index in time. Every frame comes once.
    Raises ValueError for an unknown grouping or an encoder output that is not (clips, N, tokens, hidden)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    check_positive_int("chunk_frames", chunk_frames)
    groups = GROUPINGS[grouping](pixels.shape[0], encoder_frames)
    time_order_permutation(groups)  # every frame exactly once
    clips_per_call = max(1, chunk_frames // encoder_frames)
    for first in range(0, groups.shape[0], clips_per_call):
        chunk = groups[first:first + clips_per_call]
        index = torch.from_numpy(chunk.ravel()).to(pixels.device)
        tokens = encode_clips(pixels[index].unflatten(0, chunk.shape))
        if tokens.ndim != 4 or tokens.shape[:2] != chunk.shape:
            raise ValueError(f"encoder returned shape {tuple(tokens.shape)}; expected {chunk.shape} clips x frames "
                             "first, then tokens and hidden")
        yield index, tokens.flatten(0, 1)


def in_time_order(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], num_frames: int) -> torch.Tensor:
    """`encoded_chunks`' output as (num_frames * tokens_per_frame, hidden) in frame-time order,
    each chunk written straight to its rows."""
    out = None
    for index, tokens in chunks:
        if out is None:
            out = tokens.new_empty((num_frames, *tokens.shape[1:]))
        out[index.to(out.device)] = tokens
    return out.flatten(0, 1)


def encode_in_groups(pixels: torch.Tensor, encode_clips: ClipEncoder, encoder_frames: int,
                     grouping: str = "interleaved", chunk_frames: int = ENCODER_CHUNK_FRAMES) -> torch.Tensor:
    """(F, C, H, W) frames, F a multiple of N -> (F * tokens_per_frame, hidden) in frame-time order,
    encoded `chunk_frames // N` clips (at least one) a call (`encoded_chunks`). Raises ValueError
    for an unknown grouping or an encoder output that is not (clips, N, tokens, hidden)."""
    return in_time_order(encoded_chunks(pixels, encode_clips, encoder_frames, grouping, chunk_frames),
                         pixels.shape[0])
