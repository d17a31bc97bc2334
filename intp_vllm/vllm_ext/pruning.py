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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
