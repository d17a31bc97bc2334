"""Video token pruning after INTP's rearrangement: vLLM's EVS and VidCom2 on Video-LLaVA's tokens.

vLLM prunes a video's tokens after its encoder (`vllm.multimodal.video_prune`: EVS, Bagrov et
al. 2025, drops the tokens least changed since the previous frame; VidCom2, Liu et al., EMNLP
2025, keeps each frame's most distinctive tokens under a per-frame budget). The server sets a
rate with vLLM's `--video-pruning-rate` / `--video-pruning-method`; a request may set its own
(`mm_processor_kwargs` `pruning_rate`, `pruning_method`). Rate 0 prunes nothing.

Pruning runs on the projected tokens in frame-time order, after INTP's groups are put back, so
"the previous frame" is the previous frame in time. A Video-LLaVA frame is a CLS token then a
grid of patches: **each frame's CLS token is always kept**, and the method prunes the patch
tokens. The CLS token is the frame's only summary of the whole picture and marks where the
frame sits in time; kept, even a frame whose every patch repeats its neighbour's still shows
the language model that time went by (1 of 257 tokens a frame at 224 px). A model without a
CLS token (LLaVA-NeXT-Video's pooled patches) has every token pruned by the method. The kept
count is known from the frame count alone (placeholders equal the kept tokens), as vLLM requires.

Pruning runs as the encoder's chunks come (`VideoPruning.prune_chunks`, fed by
`core.grouped_encoding.encoded_chunks`): for EVS a frame is scored as soon as it and the frame
before it in time are encoded (INTP's interleaved clips put time neighbours in different
chunks; such a frame waits for its neighbour), and only the best-scored tokens so far are kept,
as many as the video keeps in all. So the encoder's output for the whole video is never held:
peak memory is the kept tokens, one chunk and the frames waiting for a neighbour, and the kept
tokens are those that pruning them all at once keeps, bit for bit (EVS takes the top scores over
the whole video with ties to the earlier token, and every token of that top is in the top of
any part of the video that holds it). VidCom2 scores each token against the whole video's
channel variances and mean: it prunes once all chunks are in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRUNING_METHODS = ("evs", "vidcom2")
"""vLLM's `VideoPruningMethod`s, in the order of their codes in a video's data."""


@dataclass(frozen=True)
class VideoPruning:
    """A request's pruning: `method` (one of PRUNING_METHODS) and `rate`, the fraction of patch
    tokens dropped, in [0, 1). Raises ValueError naming the field otherwise."""

    method: str = "evs"
    rate: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in PRUNING_METHODS:
            raise ValueError(f"pruning_method {self.method!r} is not one of {', '.join(PRUNING_METHODS)}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate < 1 \
                or not math.isfinite(self.rate):
            raise ValueError(f"pruning_rate {self.rate!r}: expected a number in [0, 1) (0 prunes nothing)")

    @property
    def code(self) -> int:
        """The method's index in PRUNING_METHODS (how a video's data carries it)."""
        return PRUNING_METHODS.index(self.method)

    @classmethod
    def from_code(cls, code: int, rate: float) -> "VideoPruning":
        return cls(PRUNING_METHODS[int(code)], float(rate))

    @classmethod
    def of_server(cls, multimodal_config) -> "VideoPruning":
        """The server's pruning: vLLM's --video-pruning-rate / --video-pruning-method
        (`MultiModalConfig`; rate 0 when it has none or is None)."""
        spec = multimodal_config.get_video_pruning_spec() if multimodal_config is not None else None
        return cls() if spec is None else cls(*spec)

    def _module(self):
        from intp_vllm.vllm_ext.internals import evs, vidcom2

        return {"evs": evs, "vidcom2": vidcom2}[self.method]

    def kept_tokens(self, frames: int, tokens_per_frame: int, cls_token: bool = True) -> int:
        """Tokens left of `frames` frames of `tokens_per_frame` tokens (CLS + patches, or
        patches alone without `cls_token`): every CLS, and the method's count of patches
        (`compute_retained_tokens_count`)."""
        if not self.rate:
            return frames * tokens_per_frame
        first = int(cls_token)
        return first * frames + self._module().compute_retained_tokens_count(tokens_per_frame - first, frames,
                                                                             self.rate)

    def retention_mask(self, embeds, frames: int, cls_token: bool = True):
        """(frames * tokens_per_frame,) bool, True for kept tokens, of `embeds`
        (frames * tokens_per_frame, hidden) in frame-time order, CLS first in each frame
        (with `cls_token`); `kept_tokens` of them are True. The method's
        `compute_retention_mask` scores the patches (as a grid of one row a frame: neither
        method uses the layout within a frame)."""
        import torch

        per_frame = embeds.shape[0] // frames
        first = int(cls_token)
        mask = torch.ones(frames, per_frame, dtype=torch.bool, device=embeds.device)
        if self.rate:
            patches = embeds.unflatten(0, (frames, per_frame))[:, first:].flatten(0, 1)
            kept = self._module().compute_retention_mask(patches, (frames, 1, per_frame - first), 1, self.rate)
            mask[:, first:] = kept.view(frames, per_frame - first)
        return mask.flatten()

    def prune_chunks(self, chunks: Iterable[tuple["torch.Tensor", "torch.Tensor"]], frames: int,
                     cls_token: bool = True) -> "torch.Tensor":
        """The kept tokens (kept_tokens, hidden) in frame-time order of a video of `frames` frames
        given as chunks (frame indices (n,), tokens (n, tokens_per_frame, hidden)) in any order,
        each frame once (`encoded_chunks`): `embeds[retention_mask(embeds, frames, cls_token)]`
        of the time-ordered embeds, bit for bit, pruned as the chunks come (module docstring)."""
        from intp_vllm.core.grouped_encoding import in_time_order

        if self.rate and self.method == "evs":
            return _StreamingEvs(frames, self.rate, cls_token).run(chunks)
        tokens = in_time_order(chunks, frames)
        return tokens[self.retention_mask(tokens, frames, cls_token)] if self.rate else tokens


class _StreamingEvs:
    """vLLM's EVS (`evs.compute_retention_mask`) over a video's patch tokens as they come: a
    token's score is 1 - cosine similarity to the same patch of the frame before (255 for the
    first frame's), and the `compute_retained_tokens_count` best-scored ones are kept (ties: the
    earlier token, as vLLM's stable sort); each frame's CLS (with `cls_token`) is always kept."""

    def __init__(self, frames: int, rate: float, cls_token: bool):
        self.frames, self.rate, self.first = frames, rate, int(cls_token)
        self.waiting = {}  # frame -> its patches, while it or the frame after it is unscored
        self.scored = [False] * frames
        self.cls = None  # (frames, first, hidden)
        self.ids = self.scores = self.kept = None  # the best so far: patch ids (frame * P + patch), scores, tokens

    def run(self, chunks) -> "torch.Tensor":
        import torch

        for index, tokens in chunks:
            if self.cls is None:
                self.patches = tokens.shape[1] - self.first
                self.keep = VideoPruning("evs", self.rate)._module().compute_retained_tokens_count(
                    self.patches, self.frames, self.rate)
                self.cls = tokens.new_empty((self.frames, self.first, tokens.shape[2]))
                self.ids = torch.empty(0, dtype=torch.int64, device=tokens.device)
                self.scores, self.kept = tokens.new_empty(0), tokens.new_empty((0, tokens.shape[2]))
            self.cls[index] = tokens[:, :self.first]
            for frame, frame_tokens in zip(index.tolist(), tokens[:, self.first:]):
                self.waiting[frame] = frame_tokens
            arrived = index.tolist()
            self._score(sorted(f for f in {*arrived, *(f + 1 for f in arrived)}
                               if f < self.frames and not self.scored[f] and f in self.waiting
                               and (f == 0 or f - 1 in self.waiting)))
        if not all(self.scored):
            raise ValueError(f"chunks covered {sum(self.scored)} of {self.frames} frames")
        return self._in_time_order()

    def _score(self, frames: list[int]) -> None:
        import torch

        if not frames:
            return
        current = torch.stack([self.waiting[f] for f in frames])
        previous = torch.stack([self.waiting[f - 1] if f else self.waiting[f] for f in frames])
        dissimilarity = 1 - torch.nn.functional.cosine_similarity(current, previous, dim=-1)  # as evs.py
        if frames[0] == 0:
            dissimilarity[0] = 255
        ids = (torch.tensor(frames, device=current.device)[:, None] * self.patches
               + torch.arange(self.patches, device=current.device)).flatten()
        for f in frames:
            self.scored[f] = True
        for f in {*frames, *(f - 1 for f in frames if f)}:  # a scored frame whose successor is scored too
            if self.scored[f] and (f + 1 == self.frames or self.scored[f + 1]):
                self.waiting.pop(f, None)
        ids = torch.cat([self.ids, ids])
        scores = torch.cat([self.scores, dissimilarity.flatten()])
        kept = torch.cat([self.kept, current.flatten(0, 1)])
        by_id = torch.argsort(ids)
        best = by_id[torch.argsort(scores[by_id], descending=True, stable=True)[:self.keep]]
        best = best[torch.argsort(ids[best])]
        self.ids, self.scores, self.kept = ids[best], scores[best], kept[best]

    def _in_time_order(self) -> "torch.Tensor":
        import torch

        per_frame = self.first + self.patches
        frames = torch.arange(self.frames, device=self.ids.device)
        cls_rows = (frames[:, None] * per_frame + torch.arange(self.first, device=frames.device)).flatten()
        patch_rows = self.ids // self.patches * per_frame + self.first + self.ids % self.patches
        order = torch.argsort(torch.cat([cls_rows, patch_rows]))
        return torch.cat([self.cls.flatten(0, 1), self.kept])[order]
