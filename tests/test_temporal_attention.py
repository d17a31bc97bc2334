"""A tower that mixes the frames of its N-frame window: served by the plugin with either grouping,
equal to the HF reference that groups the same way, and different from the other grouping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.core.config import GROUPINGS
from intp_vllm.research.hf_video_llava import TemporalVideoLlavaForConditionalGeneration, hf_model_class
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.core.temporal_attention import TemporalAttention, TemporalAttentionSpec
from intp_vllm.research.tiny_model import TinyModelSpec, build_config, build_tokenizer, make_tiny_model

PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"
NEW_TOKENS = 16
FRAMES = 32


@pytest.fixture(scope="module")
def temporal_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("temporal"), TinyModelSpec(temporal_attention_heads=2, seed=4))


@pytest.fixture(scope="module")
def video32():
    return moving_shapes_video(num_frames=FRAMES, height=64, width=80, seed=7)


def hf_reference(model_dir, grouping: str):
    return load_hf_model(str(model_dir), intp_json=json.dumps({"frames": FRAMES, "grouping": grouping}))


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.engine
def test_plugin_equals_hf_reference_with_the_same_grouping(temporal_dir, video32, grouping):
    llm = make_llm(temporal_dir, hf_overrides={"intp": {"frames": FRAMES, "rope_type": "none",
                                                        "grouping": grouping}})
    videos = {"32 frames": video32, "8 frames": video32[::4]}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    try:
        outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": v}} for v in videos.values()],
                               params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
    reference = hf_reference(temporal_dir, grouping)
    for (name, video), output in zip(videos.items(), outputs):
        tokens, logprobs = hf_generate(reference, output.prompt_token_ids, hf_pixel_values(video, 56), NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens, name
        np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0, err_msg=name)

    # Negative control: the other grouping puts other frames in each clip, and the answer changes.
    other = next(g for g in GROUPINGS if g != grouping)
    wrong, _ = hf_generate(hf_reference(temporal_dir, other), outputs[0].prompt_token_ids,
                           hf_pixel_values(video32, 56), NEW_TOKENS)
    assert wrong != list(outputs[0].outputs[0].token_ids)


def test_reference_class_equals_stock_hf_for_a_per_frame_tower():
    config = build_config(TinyModelSpec(), build_tokenizer())
    config.intp = {"frames": 16, "grouping": "interleaved"}
    assert hf_model_class(config) is VideoLlavaForConditionalGeneration
    torch.manual_seed(0)
    stock = VideoLlavaForConditionalGeneration(config).eval()
    ours = TemporalVideoLlavaForConditionalGeneration(config).eval()
    ours.load_state_dict(stock.state_dict())
    ids = torch.tensor([[1] + [config.video_token_index] * 16 * 17 + [5]])
    pixels = torch.randn(1, 16, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, pixel_values_videos=pixels).logits,
                           stock(input_ids=ids, pixel_values_videos=pixels).logits)


def test_temporal_attention_mixes_frames_only_within_a_clip():
    torch.manual_seed(0)
    attention = TemporalAttention(TemporalAttentionSpec(frames=4, num_heads=2), hidden_size=8).eval()
    features = torch.randn(3, 4, 5, 8)
    changed = features.clone()
    changed[1, 2] += torch.randn(5, 8)  # one frame of clip 1 (not a constant: LayerNorm removes those)
    with torch.no_grad():
        before, after = attention(features), attention(changed)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])  # other clips untouched
    assert not torch.allclose(before[1, 0], after[1, 0])  # other frames of the same clip see it
    with pytest.raises(ValueError, match="takes 4-frame clips"):
        attention(features[:, :3])


@pytest.mark.parametrize("section, message", [
    ({"frames": 8}, "exactly the keys"),
    ({"frames": 8, "num_heads": 2, "depth": 1}, "exactly the keys"),
    ({"frames": 0, "num_heads": 2}, "temporal_attention.frames must be a positive integer"),
    ({"frames": 8, "num_heads": True}, "temporal_attention.num_heads must be a positive integer"),
])
def test_bad_temporal_attention_config_is_an_error(section, message):
    config = build_config(TinyModelSpec(), build_tokenizer())
    config.temporal_attention = section
    with pytest.raises(ValueError, match=message):
        TemporalAttentionSpec.from_hf_config(config)


def test_heads_must_divide_the_tower_width():
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the tower's hidden size \(64\)"):
        TemporalAttention(TemporalAttentionSpec(frames=8, num_heads=3), hidden_size=64)
