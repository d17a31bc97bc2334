"""vLLM with the plugin against HF transformers on the same tiny checkpoint and 8 frames."""

from __future__ import annotations

import os

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import read_video, write_video

pytestmark = pytest.mark.engine

FRAMES = 8
TOKENS_PER_FRAME = (56 // 14) ** 2 + 1
NEW_TOKENS = 16
QUESTION = "What is happening in this video?"
PROMPT = f"USER: <video>\n{QUESTION} ASSISTANT:"
LOGPROB_ATOL = 2e-3


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    """Non-square and larger than the tower's 56 px, so resize and crop both act."""
    return moving_shapes_video(num_frames=FRAMES, height=72, width=100, seed=1)


def test_ndarray_video_matches_hf(tiny_llm, tiny_model_dir, video):
    output = tiny_llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": video}}, greedy(), use_tqdm=False)[0]
    video_token = tiny_llm.llm_engine.model_config.hf_config.video_token_index
    assert output.prompt_token_ids.count(video_token) == FRAMES * TOKENS_PER_FRAME

    hf_model = load_hf_model(str(tiny_model_dir))
    hf_tokens, hf_logprobs = hf_generate(hf_model, output.prompt_token_ids, hf_pixel_values(video, 56), NEW_TOKENS)
    assert list(output.outputs[0].token_ids) == hf_tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), hf_logprobs, atol=LOGPROB_ATOL, rtol=0)

    # Negative control: the same comparison with the frames reversed must fail.
    reversed_tokens, _ = hf_generate(hf_model, output.prompt_token_ids, hf_pixel_values(video[::-1], 56), NEW_TOKENS)
    assert reversed_tokens != hf_tokens


def test_mp4_file_url_matches_hf(tiny_llm, tiny_model_dir, video):
    path = write_video(tiny_llm.media_dir / "shapes.mp4", video)
    messages = [{
        "role": "user",
        "content": [
            {"type": "video_url", "video_url": {"url": f"file://{path}"}},
            {"type": "text", "text": QUESTION},
        ],
    }]
    output = tiny_llm.chat(messages, greedy(), use_tqdm=False)[0]
    decoded = read_video(path, FRAMES)
    assert decoded.shape == (FRAMES, 72, 100, 3)

    hf_model = load_hf_model(str(tiny_model_dir))
    hf_tokens, hf_logprobs = hf_generate(hf_model, output.prompt_token_ids, hf_pixel_values(decoded, 56), NEW_TOKENS)
    assert list(output.outputs[0].token_ids) == hf_tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), hf_logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_plugin_model_runs_in_spawned_worker(tiny_llm):
    def describe(worker):
        import os

        model = worker.model_runner.model
        return os.getpid(), type(model).__module__, type(model).__name__

    [(pid, module, name)] = tiny_llm.collective_rpc(describe)
    assert pid != os.getpid()
    assert (module, name) == ("intp_vllm.vllm_ext.models.video_llava", "VideoLlavaForConditionalGeneration")


@pytest.mark.parametrize(
    "bad_video, message",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), "zero frames"),
        (np.zeros((4, 32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((4, 32, 32, 4), np.uint8), r"shape \(4, 32, 32, 4\)"),
    ],
)
def test_bad_video_is_a_clear_value_error(tiny_llm, bad_video, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": bad_video}}, greedy(2), use_tqdm=False)


def test_short_video_repeats_last_frame(tiny_llm, video):
    """3 frames are padded to the 8-frame window by repeating the last one (documented rule)."""
    short = tiny_llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": video[:3]}}, greedy(8), use_tqdm=False)[0]
    padded = np.concatenate([video[:3], np.repeat(video[2:3], FRAMES - 3, axis=0)])
    full = tiny_llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": padded}}, greedy(8), use_tqdm=False)[0]
    assert short.prompt_token_ids == full.prompt_token_ids
    assert short.outputs[0].token_ids == full.outputs[0].token_ids


def test_image_input_is_refused_video_only(tiny_llm):
    """Only video is served (README "Images"): an image is refused, not silently dropped."""
    image = np.zeros((56, 56, 3), np.uint8)
    with pytest.raises(VLLMValidationError, match=r"At most 0 image\(s\)"):
        tiny_llm.generate({"prompt": "USER: <image>\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": image}},
                          greedy(2), use_tqdm=False)
