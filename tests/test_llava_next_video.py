"""LLaVA-NeXT-Video's adapter without an engine: preprocessing bit-exact with HF's PIL CLIP
processing at the tower's 336 px, pooling equal to HF's `LlavaNextVideoPooler`, token counts,
INTP defaults and weight names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.preprocess import CLIP_MEAN, CLIP_STD, ClipPreprocessConfig, preprocess_frames
from intp_vllm.vllm_ext.models.llava_next_video import LlavaNextVideoForConditionalGeneration as Adapter
from intp_vllm.vllm_ext.models.llava_next_video import SpatialPool


def config_7b(**overrides) -> LlavaNextVideoConfig:
    """LLaVA-NeXT-Video-7B-hf's shapes (CLIP-L/14-336, Vicuna-7B with linear RoPE x2)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    text = LlamaConfig(max_position_embeddings=4096,
                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    return LlavaNextVideoConfig(vision_config=vision, text_config=text, **overrides)


def test_preprocessing_equals_hf_pil_processing_at_336():
    """Frames go through HF's PIL CLIP processing with LLaVA-NeXT-Video's video settings
    (shortest edge and crop 336, bicubic, OpenAI-CLIP mean/std): ours equals it bit for bit."""
    frames = moving_shapes_video(num_frames=3, height=480, width=854, seed=3)
    frames = np.clip(frames.astype(int) + np.random.default_rng(0).integers(-30, 30, frames.shape), 0, 255)
    frames = frames.astype(np.uint8)
    config = Adapter.preprocess_config(config_7b())
    assert config == ClipPreprocessConfig(shortest_edge=336, crop_size=336, mean=CLIP_MEAN, std=CLIP_STD)
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    expected = reference(images=list(frames), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(preprocess_frames(frames, config), expected)


@pytest.mark.parametrize("mode", ["average", "max"])
def test_pooling_equals_hf(mode):
    config = config_7b(spatial_pool_mode=mode)
    patches = torch.randn(3, 24 * 24, 1024)
    ours = SpatialPool(mode, 2)(patches)
    assert ours.shape == (3, 144, 1024)
    assert torch.equal(ours, LlavaNextVideoPooler(config)(patches))
    # negative control: the other mode differs
    other = SpatialPool("max" if mode == "average" else "average", 2)(patches)
    assert not torch.allclose(ours, other)


def test_conv_pooling_is_refused():
    with pytest.raises(ValueError, match="spatial_pool_mode 'conv' is not served; expected one of average, max"):
        SpatialPool("conv", 2)


def test_tokens_and_intp_defaults_of_the_7b():
    """144 tokens a frame, a per-frame window (N = 1), 32 frames by default (trained), and
    32 frames fit the checkpoint's trained length c * L = 8192 at scale 1."""
    config = config_7b()
    assert Adapter.tokens_per_frame(config) == 144
    intp = Adapter.intp_config(config)
    assert (intp.frames, intp.encoder_frames, intp.factor, intp.rope_type) == (32, 1, "auto", "yarn")
    assert Adapter.max_video_tokens(config) == 32 * 144
    config.intp = {"max_frames": 128}
    assert Adapter.max_video_tokens(config) == 128 * 144
    config.intp = {"frames": 8, "encoder_frames": 4}
    assert Adapter.intp_config(config).encoder_frames == 4


@pytest.mark.parametrize("name, mapped", [
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("vision_tower.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
    ("model.vision_tower.vision_model.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
    ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("model.language_model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("image_newline", None),
    ("model.image_newline", None),
])
def test_weight_names_of_the_hub_and_of_transformers_5(name, mapped):
    assert Adapter.hf_to_vllm_mapper.map_name(name) == mapped


def test_a_chat_template_only_in_the_processor_file_is_found(tmp_path):
    """vLLM reads chat_template.json through HF's processor, which needs torchvision here: the
    plugin's fallback reads it itself."""
    import json

    from intp_vllm.vllm_ext.plugin import processor_chat_template

    assert processor_chat_template(str(tmp_path)) is None
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert processor_chat_template(str(tmp_path)).read_text() == template
