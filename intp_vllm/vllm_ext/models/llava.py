"""Pieces the LLaVA-family adapters share (Video-LLaVA, LLaVA-NeXT-Video): the projector and the
tower's feature layer, as in their HF checkpoints."""

from __future__ import annotations

import torch
import torch.nn as nn

from intp_vllm.vllm_ext.internals import get_act_fn, get_layer_index


class LlavaProjector(nn.Module):
    """Linear -> act -> Linear (`multi_modal_projector.linear_1/linear_2` in the checkpoint)."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = get_act_fn(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., vision_hidden) tower features -> (..., text_hidden) language-model embeddings."""
        return self.linear_2(self.act(self.linear_1(features)))


def feature_layer_count(config) -> int:
    """Tower layers to build: up to `vision_feature_layer`, whose hidden states feed the projector
    (-2: the second to last). Raises ValueError for a list of layers."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer {config.vision_feature_layer!r}: only a single layer index "
                         "is supported")
    return get_layer_index(config.vision_feature_layer, config.vision_config.num_hidden_layers)
