"""LLaVA-NeXT-Video on the INTP layer (`llava-hf/LLaVA-NeXT-Video-7B-hf`, `-7B-DPO-hf`, `-34B-hf`).

Takes over vLLM's class for `LlavaNextVideoForConditionalGeneration` (plugin.py): vLLM's own
imports its LLaVA family, which needs torchvision, and HF's video processor is a torchvision
one; here frames are preprocessed with Pillow (video/preprocess.py, as HF's PIL CLIP processing
at the tower's 336 px) and the tower is vLLM's CLIP built directly. Video only, one video a
prompt (as vLLM serves it); `image_newline` and image inputs are not used.

What is LLaVA-NeXT-Video's own, as in HF's `LlavaNextVideoModel.get_video_features`: each frame
through CLIP to `vision_feature_layer` (-2), CLS dropped ("default" select strategy), the
(side x side) patch grid pooled by `spatial_pool_mode` (average or max) with kernel = stride =
`spatial_pool_stride` (2), then the projector: 144 tokens a frame at 336/14. The tower is per
frame, so the encoder window is N = 1 and INTP's grouping is the identity (every grouping gives
the same tokens bit for bit); INTP changes the frame count and the RoPE scale. A request gets
32 frames unless `intp.frames` says otherwise, the count the checkpoints were trained on.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from intp_vllm.vllm_ext.internals import CLIPVisionModel, VllmConfig, WeightsMapper, maybe_prefix
from intp_vllm.vllm_ext.model import IntpVideoModel, intp_video_model
from intp_vllm.vllm_ext.models.llava import LlavaProjector, feature_layer_count

TRAINED_FRAMES = 32
"""Frames a video had in LLaVA-NeXT-Video's training: a request's default count."""
POOL_MODES = {"average": nn.AvgPool2d, "max": nn.MaxPool2d}
"""`spatial_pool_mode`s served ("conv" has weights HF initialises but no checkpoint uses; refused)."""


def pooled_side(hf_config) -> int:
    """Side of a frame's pooled token grid: (image_size // patch_size) // spatial_pool_stride
    (floor, as torch's pooling; 24 // 2 = 12 for the 336/14 tower)."""
    vision = hf_config.vision_config
    return (vision.image_size // vision.patch_size) // hf_config.spatial_pool_stride


class SpatialPool(nn.Module):
    """HF's `LlavaNextVideoPooler` for average/max: (B, side^2, D) patches -> (B, pooled^2, D)."""

    def __init__(self, mode: str, stride: int):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"spatial_pool_mode {mode!r} is not served; expected one of {', '.join(POOL_MODES)}")
        self.pool = POOL_MODES[mode](kernel_size=stride, stride=stride)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, count, dim = patches.shape
        side = int(count ** 0.5)
        grid = patches.view(batch, side, side, dim).permute(0, 3, 1, 2)
        return self.pool(grid).flatten(2).transpose(1, 2)


@intp_video_model
class LlavaNextVideoForConditionalGeneration(IntpVideoModel):
    """Serves unchanged HF LLaVA-NeXT-Video checkpoints (hub layout and transformers >= 4.52 names)."""

    model_name = "LLaVA-NeXT-Video"
    cls_token = False

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            # the hub's files: vision_tower.vision_model.*, language_model.*, multi_modal_projector.*;
            # transformers >= 5 saves the tower without `vision_model.`, >= 4.52 in memory under `model.`
            re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model.",
            re.compile(r"^model\.vision_tower\.vision_model\."): "vision_tower.vision_model.",
            re.compile(r"^model\.language_model\."): "language_model.model.",
            re.compile(r"^lm_head\."): "language_model.lm_head.",
            re.compile(r"^model\.multi_modal_projector\."): "multi_modal_projector.",
            # images are not served
            re.compile(r"^(model\.)?image_newline$"): None,
        }
    )

    @classmethod
    def tokens_per_frame(cls, hf_config) -> int:
        """Pooled patches of a frame, no CLS: 144 at 336/14 with stride 2."""
        return pooled_side(hf_config) ** 2

    @classmethod
    def pool_stride(cls, hf_config) -> int:
        """`spatial_pool_stride` (2): each token pools a 2 x 2 square of patches."""
        return hf_config.spatial_pool_stride

    @classmethod
    def default_encoder_frames(cls, hf_config) -> int:
        """1: the tower sees each frame on its own."""
        return 1

    @classmethod
    def default_frames(cls, hf_config) -> int:
        """TRAINED_FRAMES (32)."""
        return TRAINED_FRAMES

    def build_video_encoder(self, vllm_config: VllmConfig, prefix: str) -> None:
        """`vision_tower` (CLIP to `vision_feature_layer`), `vision_resampler` (the pooling, no
        weights) and `multi_modal_projector`."""
        config = self.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: only "
                             "'default' (CLS dropped) is served; the pooling needs a square patch grid")
        self.vision_tower = CLIPVisionModel(
            config.vision_config,
            quant_config=vllm_config.quant_config,
            num_hidden_layers_override=feature_layer_count(config),
            require_post_norm=False,
            prefix=maybe_prefix(prefix, "vision_tower"),
        )
        self.vision_resampler = SpatialPool(config.spatial_pool_mode, config.spatial_pool_stride)
        self.multi_modal_projector = LlavaProjector(
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            config.projector_hidden_act,
            getattr(config, "multimodal_projector_bias", True),
        )

    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """Tower, CLS dropped, pooling, projector on clips (K, N, 3, H, W) -> (K, N, tokens_per_frame,
        hidden), each frame on its own (all K * N in one batch)."""
        features = self.vision_tower(clips.flatten(0, 1).to(self.vision_tower.dtype))[:, 1:]
        return self.multi_modal_projector(self.vision_resampler(features)).unflatten(0, clips.shape[:2])
