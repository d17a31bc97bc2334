"""LLaVA-NeXT-Video through the plugin's engine against HF transformers'
`LlavaNextVideoForConditionalGeneration` fed the same pixel values: tiny sensitive checkpoints
(std 0.2) without and with the checkpoint's own linear RoPE x2; 8, 32 and 64 frames mixed in one
batch, each request at its own RoPE scale, and EVS pruning of the pooled tokens; negative
controls (wrong scale, wrong frame order, the checkpoint without its x2, the other pruning
mask); INTP's grouping is the identity on this per-frame tower, bit for bit; and a served
smoke test through the openai client."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.core.request_scale import code_scale, request_scale_code
from intp_vllm.core.rope_scaling import CheckpointRope
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.research.tiny_model import TinyModelSpec, make_tiny_llava_next_video

pytestmark = pytest.mark.engine

SIZE = 112  # 8 x 8 patches of 14 px, pooled 2 x 2: 16 tokens a frame
TOKENS_PER_FRAME = 16
CONTEXT = 192  # max_position_embeddings: 8 frames (128 tokens) and the question fit; 32 frames do not
QUESTION = "Which colour came first?"
PROMPT = f"USER: <video>\n{QUESTION} ASSISTANT:"
NEW_TOKENS = 12
FRAME_COUNTS = (8, 32, 64)


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)


@pytest.fixture(scope="module")
def videos():
    return {n: moving_shapes_video(num_frames=n, height=120, width=150, seed=n) for n in (*FRAME_COUNTS, 128)}


@pytest.fixture(scope="module")
def linear_x2_dir(tmp_path_factory):
    """A checkpoint whose language model carries linear RoPE x2, as LLaVA-NeXT-Video-7B-hf's does."""
    return make_tiny_llava_next_video(tmp_path_factory.mktemp("next-linear2"),
                                      TinyModelSpec(image_size=SIZE, max_position_embeddings=CONTEXT, seed=5),
                                      rope_linear=2.0)


PRUNED = {"frames": 32, "pruning_rate": 0.5, "pruning_method": "evs"}
"""A fourth request of the plain engine's batch: 32 frames, half of the pooled tokens pruned by EVS."""


def run_engine(model_dir, rope_type: str, videos, pruned: bool = False, probe=None):
    """One engine: the three frame counts in one batch (each at its own scale, factor "auto"),
    and with `pruned` the PRUNED request; outputs by frame count (the pruned one under "pruned"),
    the workers' grouping check, and what `probe(llm, videos)` returns (None without one)."""
    llm = make_llm(model_dir, hf_overrides={"intp": {"frames": 8, "max_frames": 64, "rope_type": rope_type}})
    asks = {n: {"frames": n} for n in FRAME_COUNTS} | ({"pruned": PRUNED} if pruned else {})
    try:
        requests = [{"prompt": PROMPT, "multi_modal_data": {"video": videos[kwargs["frames"]]},
                     "mm_processor_kwargs": kwargs} for kwargs in asks.values()]
        outputs = llm.generate(requests, greedy(), use_tqdm=False)
        grouping = llm.collective_rpc(groupings_are_the_identity)
        probed = probe(llm, videos) if probe else None
    finally:
        shutdown_llm(llm)
    return dict(zip(asks, outputs)), grouping, probed


SHARED_PREFIX = "USER: " + " ".join(["the red circle moves left and the blue square stays still"] * 14)


def prefix_cache_across_scales(llm, videos) -> tuple[int, int, bool]:
    """Cached tokens of a 64-frame request after an 8-frame one with the same 150-token text
    prefix (other scales), and of the same 64-frame request again; whether both answered alike."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def ask(frames):
        return llm.generate({"prompt": SHARED_PREFIX + " <video>\nWhat happened? ASSISTANT:",
                             "multi_modal_data": {"video": videos[frames]}, "mm_processor_kwargs": {"frames": frames}},
                            params, use_tqdm=False)[0]

    ask(8)
    large, again = ask(64), ask(64)
    return large.num_cached_tokens, again.num_cached_tokens, large.outputs[0].token_ids == again.outputs[0].token_ids


def groupings_are_the_identity(worker):
    """In the worker: a 12-frame video's tokens under interleaved and consecutive groups, and the
    tower on all frames as one batch; whether all three are equal bit for bit."""
    import torch

    model, configured = worker.model_runner.model, worker.model_runner.model.intp
    pixels = torch.randn(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    results = []
    with torch.inference_mode():
        for grouping in ("interleaved", "consecutive"):
            model.intp = type(configured)(**{**configured.as_dict(), "grouping": grouping})
            results.append(model.embed_video(pixels))
        model.intp = configured
        at_once = model.encode_clips(pixels[None]).flatten(0, 2)
    return (model.intp.encoder_frames, tuple(results[0].shape),
            torch.equal(results[0], results[1]) and torch.equal(results[0], at_once))


def hf_reference(model_dir, checkpoint: CheckpointRope, rope_type: str, scale: float):
    return load_hf_model(str(model_dir), json.dumps(checkpoint.hf_rope_parameters(rope_type, rotary_dim=32,
                                                                                  factor=scale)))


def check_pruned_against_hf(model_dir, output, videos, rope_type: str):
    """The pruned request equals HF applying the same EVS mask to its pooled features (no CLS:
    every token is EVS's to prune) at the request's scale; VidCom2's mask of as many tokens disagrees."""
    from intp_vllm.vllm_ext.pruning import VideoPruning

    config = load_hf_model(str(model_dir)).config
    checkpoint = CheckpointRope.from_text_config(config.text_config)
    frames = PRUNED["frames"]
    evs = VideoPruning("evs", PRUNED["pruning_rate"])
    assert output.prompt_token_ids.count(config.video_token_index) == evs.kept_tokens(frames, TOKENS_PER_FRAME, False)
    assert evs.kept_tokens(frames, TOKENS_PER_FRAME, False) < frames * TOKENS_PER_FRAME // 2 + TOKENS_PER_FRAME
    scale = code_scale(request_scale_code(len(output.prompt_token_ids), checkpoint.trained_context))
    reference = hf_reference(model_dir, checkpoint, rope_type, scale)
    pixels = hf_pixel_values(videos[frames], SIZE)
    tokens, logprobs = hf_generate(reference, output.prompt_token_ids, pixels, NEW_TOKENS, evs, cls_token=False)
    assert list(output.outputs[0].token_ids) == tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)
    other, _ = hf_generate(reference, output.prompt_token_ids, pixels, NEW_TOKENS,
                           VideoPruning("vidcom2", PRUNED["pruning_rate"]), cls_token=False)
    assert other != tokens


def check_against_hf(model_dir, outputs, videos, rope_type: str, factor: float | None = None):
    """Each request equals HF at the scale its length gave it (or the fixed `factor`); HF at half
    that scale (where it is > 1) and HF on reversed frames disagree."""
    config = load_hf_model(str(model_dir)).config
    checkpoint, video_token = CheckpointRope.from_text_config(config.text_config), config.video_token_index
    for frames, output in outputs.items():
        assert output.prompt_token_ids.count(video_token) == frames * TOKENS_PER_FRAME
        if factor is None:
            scale = code_scale(request_scale_code(len(output.prompt_token_ids), checkpoint.trained_context))
            assert (scale == 1) == (frames == 8)
        else:
            scale = factor
        reference = hf_reference(model_dir, checkpoint, rope_type, scale)
        pixels = hf_pixel_values(videos[frames], SIZE)
        tokens, logprobs = hf_generate(reference, output.prompt_token_ids, pixels, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens, frames
        np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)

        reversed_pixels = hf_pixel_values(videos[frames][::-1], SIZE)
        reversed_tokens, _ = hf_generate(reference, output.prompt_token_ids, reversed_pixels, NEW_TOKENS)
        assert reversed_tokens != tokens, f"{frames} frames: reversed frame order went unnoticed"
        if scale == 1 and checkpoint.linear_factor != 1:
            # negative control: the checkpoint without its own linear scaling is another model
            plain = load_hf_model(str(model_dir), json.dumps({"rope_type": "default", "rope_theta": checkpoint.base}))
            plain_tokens, _ = hf_generate(plain, output.prompt_token_ids, pixels, NEW_TOKENS)
            assert plain_tokens != tokens, "the checkpoint's linear x2 went unnoticed"
        if scale > 1:
            wrong = hf_reference(model_dir, checkpoint, rope_type, max(1.0, scale / 2))
            wrong_tokens, _ = hf_generate(wrong, output.prompt_token_ids, pixels, NEW_TOKENS)
            assert wrong_tokens != tokens, f"{frames} frames: half the scale went unnoticed"


def check_grouping_is_the_identity(grouping):
    window, shape, identical = grouping[0]
    assert window == 1
    assert tuple(shape) == (12 * TOKENS_PER_FRAME, 128)
    assert identical


def test_plain_checkpoint_yarn_matches_hf(tmp_path_factory, videos):
    """No rope_scaling in the checkpoint, INTP's default YaRN: 8 frames run the checkpoint as is,
    32 and 64 frames YaRN at their own scale, and 32 frames pruned by EVS, in one batch;
    grouping changes nothing; no prefix-cache reuse across scales."""
    model_dir = make_tiny_llava_next_video(tmp_path_factory.mktemp("next-plain"),
                                           TinyModelSpec(image_size=SIZE, max_position_embeddings=CONTEXT, seed=4))
    outputs, grouping, (cached_across, cached_again, same) = run_engine(model_dir, "yarn", videos, pruned=True,
                                                                       probe=prefix_cache_across_scales)
    check_grouping_is_the_identity(grouping)
    assert cached_across == 0  # the 8-frame request's prefix blocks (another scale) were not reused
    assert cached_again >= 128 and same  # prefix caching is on and works within one scale
    check_pruned_against_hf(model_dir, outputs.pop("pruned"), videos, "yarn")
    check_against_hf(model_dir, outputs, videos, "yarn")


def test_linear_x2_checkpoint_ntk_matches_hf(linear_x2_dir, videos):
    """The checkpoint's own linear x2 (as LLaVA-NeXT-Video-7B-hf): 8 frames run exactly the
    checkpoint's rotary; past its trained length 2 x 192, the paper's NTK composes with it
    (CheckpointRope: transformers' linear x2 at the NTK base)."""
    outputs, _, _ = run_engine(linear_x2_dir, "ntk", videos)
    check_against_hf(linear_x2_dir, outputs, videos, "ntk")


def test_linear_x2_checkpoint_fixed_factor_at_64_and_128_frames_matches_hf(linear_x2_dir, videos):
    """A fixed factor (intp.factor 4, linear) over the checkpoint's x2: transformers' linear x8,
    at 64 and 128 frames in one batch."""
    llm = make_llm(linear_x2_dir, hf_overrides={"intp": {"frames": 64, "max_frames": 128, "rope_type": "linear",
                                                         "factor": 4.0}})
    try:
        requests = [{"prompt": PROMPT, "multi_modal_data": {"video": videos[n]}, "mm_processor_kwargs": {"frames": n}}
                    for n in (64, 128)]
        outputs = dict(zip((64, 128), llm.generate(requests, greedy(), use_tqdm=False)))
    finally:
        shutdown_llm(llm)
    assert len(outputs[128].prompt_token_ids) > 4 * 2 * CONTEXT  # past even the scaled context: positions extrapolate
    check_against_hf(linear_x2_dir, outputs, videos, "linear", factor=4.0)


def test_served_through_the_openai_client(tmp_path_factory):
    """`intp-vllm serve DIR` with no memory flag, the openai client, a system message and an HD
    H.264 file: the answer comes back, the video costs 16 tokens a frame at the request's count,
    and the system message reaches the prompt. The checkpoint keeps its chat template in the
    processor's chat_template.json only, as llava-hf repositories may (plugin.processor_chat_template)."""
    import av
    from openai import OpenAI

    from intp_vllm_benchmarks.load_test import serve
    from intp_vllm.video.io import write_video

    model_dir = make_tiny_llava_next_video(tmp_path_factory.mktemp("next-served"),
                                           TinyModelSpec(image_size=SIZE, max_position_embeddings=CONTEXT, seed=6),
                                           rope_linear=2.0)
    template = model_dir / "chat_template.jinja"
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    media = tmp_path_factory.mktemp("next-media")
    path = write_video(media / "hd.mp4", moving_shapes_video(num_frames=24, height=720, width=1280, seed=9))
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    args = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0", "--max-frames", "16",
            "--allowed-local-media-path", str(media), "--trust-request-mm-kwargs"]
    with serve(model_dir, args) as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")

        def ask(system: bool, frames: int):
            messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                                     {"type": "text", "text": QUESTION}]}]
            if system:
                messages.insert(0, {"role": "system", "content": "You answer about colours and shapes."})
            extra = {"mm_processor_kwargs": {"frames": frames}, "ignore_eos": True}
            return client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=6,
                                                  temperature=0, extra_body=extra)

        eight, sixteen, no_system = ask(True, 8), ask(True, 16), ask(False, 8)
    assert eight.usage.completion_tokens == 6 and eight.choices[0].message.content
    assert sixteen.usage.prompt_tokens - eight.usage.prompt_tokens == 8 * TOKENS_PER_FRAME
    assert eight.usage.prompt_tokens > no_system.usage.prompt_tokens


@pytest.mark.slow  # a 1 GB bf16 checkpoint written, loaded by vLLM twice and by HF once: minutes on 2 cores
def test_real_shape_bf16_checkpoint_with_hub_names_matches_hf_in_float32_and_answers_in_bf16(tmp_path_factory):
    """LLaVA-NeXT-Video-7B's shapes (Vicuna-7B width 4096/11008/32 heads, vocab 32000, CLIP-L/14
    at 336, 1 + 2 layers, linear x2, the hub's tensor names) saved in bf16 as the hub's files:
    144 tokens a frame; in float32 vLLM equals HF at 8 frames (tokens and prompt logprobs); in
    bf16 (the checkpoint's dtype) it loads with no memory flag (`--max-num-seqs 1`: one
    max_model_len sequence, the case vLLM refused before cpu_memory's block allowance) and
    answers the same prompt. (No bf16 parity with HF: bf16 kernels differ between the two on
    CPU, and an HF bf16 pass of this size is not cheap on 2 cores; float32 parity is above.)"""
    from safetensors import safe_open

    from intp_vllm.research.tiny_model import real_shape_llava_next_video_spec

    # One text layer: its KV (16 KiB a bf16 token) still puts one max_model_len sequence (8,192 +
    # 512 tokens, 136 MiB) above the 64 MiB floor; a second layer doubled the bf16 prefill (vLLM's
    # CPU bf16 matmul falls back to a slow torch path on AVX2), the costliest step of this test.
    spec = replace(real_shape_llava_next_video_spec(text_layers=1, vision_layers=2), vocab_size=32000,
                   dtype="bfloat16")
    model_dir = make_tiny_llava_next_video(tmp_path_factory.mktemp("next-real-shape"), spec, rope_linear=2.0,
                                           hub_names=True)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert f.get_slice("language_model.lm_head.weight").get_dtype() == "BF16"
    assert shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    assert shapes["language_model.model.embed_tokens.weight"] == (32000, 4096)
    assert shapes["language_model.model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    video = moving_shapes_video(num_frames=8, height=360, width=640, seed=2)
    request = {"prompt": PROMPT, "multi_modal_data": {"video": video}}
    intp = {"intp": {"frames": 8}}
    llm = make_llm(model_dir, max_num_seqs=1, kv_cache_memory_bytes=1 << 30, hf_overrides=intp)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
        output = llm.generate(request, params, use_tqdm=False)[0]
    finally:
        shutdown_llm(llm)
    # bf16, the checkpoint's dtype (dtype "auto"), and no memory flag: the plugin sizes the KV cache
    llm = make_llm(model_dir, dtype="auto", max_num_seqs=1, kv_cache_memory_bytes=None, hf_overrides=intp)
    try:
        config = llm.llm_engine.vllm_config
        assert config.model_config.dtype == torch.bfloat16
        assert 0 < config.cache_config.kv_cache_memory_bytes < 1 << 30
        bf16 = llm.generate(request, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                            use_tqdm=False)[0]
    finally:
        shutdown_llm(llm)
    try:
        hf = load_hf_model(str(model_dir))
        assert output.prompt_token_ids.count(hf.config.video_token_index) == 8 * 144
        tokens, logprobs = hf_generate(hf, output.prompt_token_ids, hf_pixel_values(video, 336), 6)
    finally:
        load_hf_model.cache_clear()
    assert list(output.outputs[0].token_ids) == tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)
    assert bf16.prompt_token_ids == output.prompt_token_ids and len(bf16.outputs[0].token_ids) == 6
