"""HF transformers Video-LLaVA that encodes video the way the plugin does.

Stock HF Video-LLaVA runs every frame through the tower on its own and knows nothing of
INTP. `TemporalVideoLlavaForConditionalGeneration` encodes a video in N-frame groups
(`intp.grouping` of the config), each group through the tower, the temporal attention when
the config has one (temporal_attention.py) and the projector, with the tokens put back in
frame-time order. It trains the windowed needle model (needle.py) and is the numeric
reference for it; the plugin serves its checkpoints under the same architecture name.
With a per-frame tower it computes what the stock class computes.
"""

from __future__ import annotations

import torch
from transformers import VideoLlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.video_llava.modeling_video_llava import VideoLlavaModel

from intp_vllm.core.config import IntpConfig
from intp_vllm.core.grouped_encoding import encode_in_groups
from intp_vllm.core.temporal_attention import TemporalAttention, TemporalAttentionSpec


class TemporalVideoLlavaModel(VideoLlavaModel):
    def __init__(self, config):
        super().__init__(config)
        spec = TemporalAttentionSpec.from_hf_config(config)
        self.temporal_attention = TemporalAttention(spec, config.vision_config.hidden_size) if spec else None
        self.post_init()

    def get_video_features(self, pixel_values_videos: torch.Tensor, vision_feature_layer: int | None = None,
                           **kwargs) -> BaseModelOutputWithPooling:
        """(B, F, 3, H, W) with F a multiple of N -> pooler_output (B * F, tokens_per_frame, hidden)."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
        intp = IntpConfig.from_hf_config(self.config)

        def encode_clips(clips: torch.Tensor) -> torch.Tensor:
            hidden = self.video_tower(clips.flatten(0, 1), output_hidden_states=True).hidden_states[layer]
            hidden = hidden.unflatten(0, clips.shape[:2])
            if self.temporal_attention is not None:
                hidden = self.temporal_attention(hidden)
            return self.multi_modal_projector(hidden)

        features = [encode_in_groups(video, encode_clips, intp.encoder_frames, intp.grouping)
                    for video in pixel_values_videos]
        frames = pixel_values_videos.shape[0] * pixel_values_videos.shape[1]
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features).unflatten(0, (frames, -1)))


class TemporalVideoLlavaForConditionalGeneration(VideoLlavaForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self.model = TemporalVideoLlavaModel(config)
        self.post_init()


def hf_model_class(config) -> type:
    """The HF class of a checkpoint's config: `LlavaNextVideoForConditionalGeneration` for a
    LLaVA-NeXT-Video; for Video-LLaVA the stock class with a per-frame tower, ours when the
    config has temporal attention."""
    if config.model_type == "llava_next_video":
        from transformers import LlavaNextVideoForConditionalGeneration

        return LlavaNextVideoForConditionalGeneration
    if TemporalAttentionSpec.from_hf_config(config) is None:
        return VideoLlavaForConditionalGeneration
    return TemporalVideoLlavaForConditionalGeneration
