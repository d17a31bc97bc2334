"""A video tower that mixes frames inside its N-frame window, as LanguageBind's does.

HF's Video-LLaVA port encodes every frame on its own, so for it INTP's grouping changes
nothing. The original LanguageBind video tower attends across the frames of its 8-frame
clip and adds a temporal embedding with exactly 8 slots: it only ever takes N-frame clips,
and which frames share a clip changes what each frame's tokens say. That is the setting in
which the INTP paper's interleaved groups are meant to beat consecutive chunks.

A checkpoint opts in with `"temporal_attention": {"frames": N, "num_heads": H}` in its
config: after the selected CLIP layer, every patch position attends across the N frames of
its clip (learned temporal embedding, pre-norm, residual), then the projector runs. Weights
are `model.temporal_attention.*` in the checkpoint. The same module serves in vLLM
(`model.py`) and in the HF model that trains and checks it (`hf_video_llava.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from intp_vllm.core.checks import check_positive_int

CONFIG_KEY = "temporal_attention"


@dataclass(frozen=True)
class TemporalAttentionSpec:
    frames: int
    num_heads: int

    @classmethod
    def from_hf_config(cls, hf_config) -> "TemporalAttentionSpec | None":
        """`hf_config.temporal_attention`, validated; None when the tower is per-frame."""
        section = getattr(hf_config, CONFIG_KEY, None)
        if section is None:
            return None
        allowed = {"frames", "num_heads"}
        if not isinstance(section, dict) or set(section) != allowed:
            raise ValueError(f"{CONFIG_KEY} must be a mapping with exactly the keys {sorted(allowed)}, "
                             f"got {section!r}")
        for name in sorted(allowed):
            check_positive_int(f"{CONFIG_KEY}.{name}", section[name])
        return cls(**section)

    def as_dict(self) -> dict:
        return {"frames": self.frames, "num_heads": self.num_heads}


class TemporalAttention(nn.Module):
    """(K clips, N frames, P tokens, C) -> same shape; each token attends to its position in the N frames."""

    def __init__(self, spec: TemporalAttentionSpec, hidden_size: int):
        super().__init__()
        if hidden_size % spec.num_heads:
            raise ValueError(f"{CONFIG_KEY}.num_heads ({spec.num_heads}) must divide the tower's hidden size "
                             f"({hidden_size})")
        self.frames = spec.frames
        self.temporal_embedding = nn.Parameter(torch.zeros(spec.frames, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.attention = nn.MultiheadAttention(hidden_size, spec.num_heads, batch_first=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        clips, frames, tokens, hidden = features.shape
        if frames != self.frames:
            raise ValueError(f"temporal attention takes {self.frames}-frame clips (its temporal embedding's "
                             f"slots), got {frames}")
        per_token = (features + self.temporal_embedding[None, :, None, :]).transpose(1, 2)
        per_token = per_token.reshape(clips * tokens, frames, hidden)
        normed = self.norm(per_token)
        mixed, _ = self.attention(normed, normed, normed, need_weights=False)
        return (per_token + mixed).reshape(clips, tokens, frames, hidden).transpose(1, 2)
