"""Video-LLaVA on the INTP layer: vLLM has no Video-LLaVA, and its LLaVA family cannot be
imported without torchvision, so the tower is vLLM's CLIP built here and the language model
vLLM's Llama (`IntpVideoModel`). Video only: the image tower's weights are skipped (README).

What is Video-LLaVA's own: a CLIP tower at `vision_feature_layer` keeping CLS (257 tokens a
frame at 224/14), a Linear-GELU-Linear projector, an encoder window of N frames recorded as
`video_seq_length` (8), and, in our `TemporalVideoLlava` checkpoints, a temporal attention that
mixes the N frames of each clip (core/temporal_attention.py), where INTP's grouping matters.
"""

from __future__ import annotations

import re

import torch

from intp_vllm.vllm_ext.internals import CLIPVisionModel, VllmConfig, WeightsMapper, maybe_prefix
from intp_vllm.core.config import tokens_per_frame
from intp_vllm.core.temporal_attention import TemporalAttention, TemporalAttentionSpec
from intp_vllm.vllm_ext.model import IntpVideoModel, intp_video_model
from intp_vllm.vllm_ext.models.llava import LlavaProjector, feature_layer_count


@intp_video_model
class VideoLlavaForConditionalGeneration(IntpVideoModel):
    """Serves unchanged HF Video-LLaVA checkpoints (`LanguageBind/Video-LLaVA-7B-hf` layout)."""

    model_name = "Video-LLaVA"
    cls_token = True

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            # transformers >= 5 drops `vision_model.` when saving; hub files keep it.
            re.compile(r"^(model\.)?video_tower\.(?!vision_model\.)"): "video_tower.vision_model.",
            re.compile(r"^model\.video_tower\.vision_model\."): "video_tower.vision_model.",
            # in-memory transformers names (model.language_model.*, lm_head.*)
            re.compile(r"^model\.language_model\."): "language_model.model.",
            re.compile(r"^lm_head\."): "language_model.lm_head.",
            re.compile(r"^model\.(multi_modal_projector|temporal_attention)\."): r"\1.",
            # video only: the image tower is not loaded (see README)
            re.compile(r"^(model\.)?image_tower\."): None,
        }
    )

    @classmethod
    def tokens_per_frame(cls, hf_config) -> int:
        """Patches + CLS (`core.config.tokens_per_frame`): 257 at 224 px / 14 px patches."""
        return tokens_per_frame(hf_config.vision_config.image_size, hf_config.vision_config.patch_size)

    def build_video_encoder(self, vllm_config: VllmConfig, prefix: str) -> None:
        """`video_tower` (CLIP to `vision_feature_layer`), `multi_modal_projector` and, when the
        config has one, `temporal_attention`."""
        config = self.config
        vision = config.vision_config
        self.video_tower = CLIPVisionModel(
            vision,
            quant_config=vllm_config.quant_config,
            num_hidden_layers_override=feature_layer_count(config),
            require_post_norm=False,
            prefix=maybe_prefix(prefix, "video_tower"),
        )
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size,
            config.text_config.hidden_size,
            config.projector_hidden_act,
            getattr(config, "multimodal_projector_bias", True),
        )
        self.temporal_attention = self._build_temporal_attention(config)

    def _build_temporal_attention(self, config) -> TemporalAttention | None:
        spec = TemporalAttentionSpec.from_hf_config(config)
        if spec is None:
            return None
        if spec.frames != self.intp.encoder_frames:
            raise ValueError(
                f"intp.encoder_frames ({self.intp.encoder_frames}) must equal temporal_attention.frames "
                f"({spec.frames}): the tower's temporal embedding has exactly that many slots"
            )
        return TemporalAttention(spec, config.vision_config.hidden_size)

    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """Frozen tower + projector on clips (K, N, 3, H, W) -> (K, N, tokens_per_frame, hidden).

        The CLIP tower sees each frame on its own, so all K*N frames go through in one
        batch; the temporal attention, when the checkpoint has one, then mixes the N frames
        of each clip.
        """
        features = self.video_tower(clips.flatten(0, 1).to(self.video_tower.dtype)).unflatten(0, clips.shape[:2])
        if self.temporal_attention is not None:
            features = self.temporal_attention(features)
        return self.multi_modal_projector(features)
