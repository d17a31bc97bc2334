"""Video-LLaVA-7B's real tensor names and shapes (few layers) load in vLLM and HF alike."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.research.synthetic import moving_shapes_video

pytestmark = pytest.mark.engine

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def real_shape_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("real-shape")
    subprocess.run(
        [sys.executable, "-m", "intp_vllm.apps.cli", "make-tiny-model", str(path), "--real-shape"],
        check=True,
    )
    return path


def test_real_shape_checkpoint_has_hub_names_and_7b_shapes(real_shape_dir):
    from safetensors import safe_open

    with safe_open(real_shape_dir / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes["video_tower.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["language_model.model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    assert shapes["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert not any(name.startswith("video_tower.embeddings") for name in shapes)


def test_real_shape_parity_with_hf(real_shape_dir):
    video = moving_shapes_video(num_frames=8, height=240, width=320, seed=2)
    prompt = "USER: <video>\nDescribe the video. ASSISTANT:"
    llm = make_llm(real_shape_dir, max_num_seqs=1, kv_cache_memory_bytes=1 << 30)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
        output = llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, params, use_tqdm=False)[0]
    finally:
        shutdown_llm(llm)
    assert len(output.prompt_token_ids) > 8 * 257
    hf_model = load_hf_model(str(real_shape_dir))
    try:
        hf_tokens, hf_logprobs = hf_generate(hf_model, output.prompt_token_ids, hf_pixel_values(video, 224), NEW_TOKENS)
    finally:
        load_hf_model.cache_clear()
    assert list(output.outputs[0].token_ids) == hf_tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), hf_logprobs, atol=2e-3, rtol=0)
