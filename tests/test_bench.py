"""`intp-vllm bench`: the FLOP count against a hand count, and a --quick run end to end."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys

import pytest

from intp_vllm.apps.bench import ModelShape, decoder_flops, make_workload, request_flops
from intp_vllm.core.config import TEXT_MARGIN_TOKENS
from intp_vllm.vllm_ext.pruning import VideoPruning

ONE_LAYER = ModelShape(image_size=28, patch_size=14, vision_hidden=2, vision_intermediate=8, vision_layers=1,
                       tokens_per_frame=5, text_hidden=2, text_intermediate=3, text_layers=1, heads=1, kv_heads=1,
                       head_dim=2, vocab=5)


def test_decoder_flops_equals_a_hand_count():
    # Per token: q, k, v, o are 2x2 (16 multiply-adds), gate, up, down 2x3 (18): 2 * 34 = 68 FLOPs.
    # Attention: the token at position p reads p + 1 keys, 2 multiply-adds each for QK^T and AV
    # (head_dim 2): 8 (p + 1) FLOPs. Positions 0 and 1: 68 + 8 + 68 + 16 = 160.
    assert decoder_flops(0, 2, ONE_LAYER) == 160
    assert decoder_flops(2, 3, ONE_LAYER) == 68 + 24
    assert decoder_flops(0, 2, ONE_LAYER) + decoder_flops(2, 3, ONE_LAYER) == decoder_flops(0, 3, ONE_LAYER)


def test_request_flops_split_prefill_and_decode():
    # 3 prompt tokens, 2 output tokens: prefill covers positions 0..2, decode feeds back 1 token;
    # the LM head (2 x 5) runs once per output token.
    flops = request_flops(ONE_LAYER, frames=1, prompt_tokens=3, output_tokens=2)
    assert flops["prefill"] == decoder_flops(0, 3, ONE_LAYER) + 2 * 2 * 5
    assert flops["decode"] == decoder_flops(3, 4, ONE_LAYER) + 2 * 2 * 5
    assert flops["vision"] > 0 and flops["projector"] == 2 * 5 * (2 * 2 + 2 * 2)


def test_llava_next_video_flops_count_the_tower_pooling_and_projector_by_hand():
    """LLaVA-NeXT-Video's shape comes from its adapter (pooled tokens a frame, no CLS, the pool
    stride): the tower runs on every patch and CLS, the 2x2 pooling is counted, the projector
    and the language model see the pooled tokens only."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
                                       image_size=56, patch_size=14),
        text_config=LlamaConfig(vocab_size=5, hidden_size=2, intermediate_size=3, num_hidden_layers=1,
                                num_attention_heads=1, num_key_value_heads=1),
        vision_feature_layer=-2, spatial_pool_stride=2)
    shape = ModelShape.from_hf_config(config)
    # 56 / 14 = 4 x 4 patches pooled 2 x 2: 4 tokens a frame; the tower runs to layer -2 of 2: 1 layer
    assert (shape.tokens_per_frame, shape.pool_stride, shape.tower_tokens, shape.vision_layers) == (4, 2, 17, 1)
    flops = request_flops(shape, frames=3, prompt_tokens=20, output_tokens=1)
    # A frame in the tower: patch embedding 2 x 16 patches x (3 x 14 x 14) x 4 = 75264; one block on
    # 17 tokens: 2 x 17 x (4 x 4 x 4 + 2 x 4 x 8) = 4352 for the linears, 4 x 17 x 17 x 4 = 4624 for
    # attention. Pooling: 4 tokens x 4 features, each 2 x 2 inputs (3 adds and a scale): 64.
    assert flops["vision"] == 3 * (75264 + 4352 + 4624 + 64)
    # projector on the 4 pooled tokens: 2 x 4 x (4 x 2 + 2 x 2) = 96 a frame
    assert flops["projector"] == 3 * 96
    # negative control: without the pooling the vision count is 64 a frame short
    assert request_flops(replace(shape, pool_stride=1), 3, 20, 1)["vision"] == flops["vision"] - 3 * 64


def test_workload_mixes_every_pair_and_changes_videos_per_round():
    first, second = make_workload(9, (8, 16, 32), (8, 32, 64), 0), make_workload(9, (8, 16, 32), (8, 32, 64), 1)
    assert {(r.frames, r.max_tokens) for r in first} == {(f, t) for f in (8, 16, 32) for t in (8, 32, 64)}
    assert [(r.frames, r.max_tokens) for r in first] == [(r.frames, r.max_tokens) for r in second]
    assert not {r.seed for r in first} & {r.seed for r in second}


@pytest.mark.engine
def test_quick_bench_end_to_end(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "intp_vllm.apps.cli", "bench", "--quick", "--pruning-rate",
                                "0.5", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["machine"]["name"] and report["peak_flops"] > 0
    settings = report["settings"]
    assert list(report["runs"]) == ["hf_generate", "plugin_8f", "intp_16f", "unscaled_16f", "intp_16f_evs0.5"]
    requests = report["workload"]
    for name, run in report["runs"].items():
        for key in ("seconds", "req_per_s", "frames_per_s", "prompt_tokens_per_s", "output_tokens_per_s",
                    "ttft_mean_s", "kv_bytes_per_request", "peak_rss_mib", "achieved_flops_per_s"):
            assert run[key] > 0, (name, key)
        assert all(value > 0 for value in run["flops"].values()), name
        assert 0 < run["mfu"] <= 1, name
        assert run["output_tokens"] == sum(r["max_tokens"] for r in requests), name
        expected_frames = sum(min(r["frames"], run["frames_read"]) for r in requests)
        assert run["frames"] == expected_frames, name
        assert len(run["round_seconds"]) == settings["repeats"]
    # each engine's context is its longest request, with the KV cache sized from the checkpoint for all of
    # a round's requests (the tiny model's are small)
    sizes = report["engine_sizes"]
    assert sorted(sizes) == sorted(name for name in report["runs"] if name != "hf_generate")
    for name, size in sizes.items():
        assert size["kv_cache_memory_bytes"] >= len(requests) * size["request_kv_bytes"] > 0, name
    # every request ran, so none was longer than its engine's context (vLLM refuses those)
    # (16 frames read instead of 8: at most 8 more frames of 17 tokens)
    assert sizes["plugin_8f"]["max_model_len"] < sizes["intp_16f"]["max_model_len"] <= sizes["plugin_8f"][
        "max_model_len"] + 8 * 17
    # the same visual tokens for INTP and its unscaled twin, so their FLOPs are equal
    runs = report["runs"]
    assert runs["intp_16f"]["flops"] == runs["unscaled_16f"]["flops"]
    # pruning: the encoder still sees every frame; vLLM's EVS count of the patch tokens (17 a frame:
    # 16 patches + CLS, which is kept) reach the language model, whose prefill and KV cache shrink
    intp, pruned = runs["intp_16f"], runs["intp_16f_evs0.5"]
    assert pruned["pruning"] == {"method": "evs", "rate": 0.5} and intp["pruning"] is None
    assert pruned["frames"] == intp["frames"] and pruned["flops"]["vision"] == intp["flops"]["vision"]
    evs = VideoPruning("evs", 0.5)
    assert pruned["video_tokens"] == sum(evs.kept_tokens(min(r["frames"], 16), 17) for r in requests)
    assert intp["video_tokens"] == intp["frames"] * 17 > pruned["video_tokens"]
    assert pruned["flops"]["prefill"] < intp["flops"]["prefill"]
    saved = report["kv_bytes_per_token"] * (intp["video_tokens"] - pruned["video_tokens"]) / len(requests)
    assert intp["kv_bytes_per_request"] - pruned["kv_bytes_per_request"] == pytest.approx(saved)
    assert set(report["goals"]) == {"plugin_vs_hf_time_ratio", "intp_overhead", "pruning_speedup"}
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
def test_quick_bench_on_llava_next_video_end_to_end(tmp_path):
    """`--architecture llava-next-video` generates a tiny LLaVA-NeXT-Video (linear x2) and runs HF's
    LlavaNextVideoForConditionalGeneration, the plugin at 8 frames and INTP at 16 on it (three runs:
    two engines, lean): 16 pooled tokens a frame in every run, the same prompts for HF and the
    plugin, FLOPs by its shape (pooling counted)."""
    completed = subprocess.run([sys.executable, "-m", "intp_vllm.apps.cli", "bench", "--quick", "--architecture",
                                "llava-next-video", "--runs", "hf_generate,plugin_8f,intp_16f", "--output-dir",
                                str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["model_type"] == "LLaVA-NeXT-Video" and report["model_spec"]["rope_linear"] == 2.0
    shape = ModelShape(**report["model_shape"])
    assert (shape.tokens_per_frame, shape.pool_stride) == (16, 2)
    runs, requests = report["runs"], report["workload"]
    assert list(runs) == ["hf_generate", "plugin_8f", "intp_16f"] and "goals" not in report
    for name, run in runs.items():
        assert run["frames"] == sum(min(r["frames"], run["frames_read"]) for r in requests), name
        assert run["video_tokens"] == 16 * run["frames"], name
        assert run["output_tokens"] == sum(r["max_tokens"] for r in requests), name
        assert 0 < run["mfu"] <= 1, name
    # HF gets the prompts the plugin's processor makes: the same token counts, so the same FLOPs
    assert runs["hf_generate"]["prompt_tokens"] == runs["plugin_8f"]["prompt_tokens"]
    assert runs["hf_generate"]["flops"] == runs["plugin_8f"]["flops"]
    # the vision FLOPs are the tower on every frame and the 2x2 pooling of its patches
    frames = runs["intp_16f"]["frames"]
    assert runs["intp_16f"]["flops"]["vision"] == request_flops(shape, frames, 1, 1)["vision"]
    assert runs["intp_16f"]["flops"]["vision"] > request_flops(replace(shape, pool_stride=1), frames, 1, 1)["vision"]
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


H100_FREE_BYTES = 79 << 30
VIDEO_LLAVA_7B_WEIGHT_BYTES = 14_100_000_000  # the hub's bf16 safetensors, ~7.05e9 parameters


@pytest.fixture(scope="module")
def video_llava_7b_config_dir(tmp_path_factory):
    """Video-LLaVA-7B's config (Vicuna-7B: 32 layers, 32 KV heads of 128; CLIP-L/14 at 224),
    tokenizer and preprocessor config, no weights: what sizing and vLLM's config read."""
    from intp_vllm.research.tiny_model import build_config, build_tokenizer, real_shape_spec, write_preprocessor_config

    path = tmp_path_factory.mktemp("video-llava-7b-config")
    spec = real_shape_spec(text_layers=32, vision_layers=24)
    tokenizer = build_tokenizer()
    config = build_config(spec, tokenizer)
    config.architectures = ["VideoLlavaForConditionalGeneration"]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_preprocessor_config(path, spec)
    return path


def _vllm_config(model_dir, run, size, monkeypatch):
    """The VllmConfig vLLM builds for the run's engine on a bf16 GPU (plugin hooks included)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # as run_vllm sets it
    load_general_plugins()
    args = EngineArgs(model=str(model_dir), dtype="bfloat16", max_num_seqs=16, limit_mm_per_prompt={"video": 1},
                      hf_overrides={"intp": run.intp} if run.intp else {}, max_model_len=size.max_model_len,
                      kv_cache_memory_bytes=size.kv_cache_memory_bytes)
    vllm_config = args.create_engine_config()
    vllm_config.cache_config.kv_cache_layout = "NHD"  # what the engine core resolves for CUDA's backends
    return vllm_config


def _check_kv(vllm_config, hf_config, block_size: int, given: int) -> None:
    """vLLM's own start-up check: one max_model_len sequence fits in `given` bytes (ValueError if not)."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    try:  # vLLM 0.33 moved it
        from vllm.v1.core.kv_cache_planning import check_enough_kv_cache_memory
    except ImportError:
        from vllm.v1.core.kv_cache_utils import check_enough_kv_cache_memory

    from intp_vllm.core.config import head_size

    text = hf_config.text_config
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=text.num_key_value_heads,
                             head_size=head_size(text), dtype=torch.bfloat16)
    check_enough_kv_cache_memory(vllm_config, {f"layer.{i}": spec for i in range(text.num_hidden_layers)}, given)


def _check_sizes(model_dir, runs, requests, sizes, per_frame: int, weights: int, monkeypatch) -> None:
    """Each vLLM run's context holds its longest request (at least its frames' `per_frame` tokens
    and the text margin) and vLLM's own check accepts its KV cache (negative control: one block
    short of one request is refused), within the H100's memory, for at least 4 requests at once."""
    from transformers import AutoConfig, AutoTokenizer

    from intp_vllm.apps.bench.sizing import request_tokens

    hf_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_token = 2 * 32 * 32 * 128 * 2
    for run in runs:
        if run.engine != "vllm":
            continue
        size = sizes[run.name]
        assert size.max_model_len == max(run.frames * per_frame + TEXT_MARGIN_TOKENS,
                                         *(request_tokens(r, run, hf_config, tokenizer) for r in requests))
        assert size.request_kv_bytes == per_token * size.max_model_len
        assert size.kv_cache_memory_bytes + weights <= 0.8 * H100_FREE_BYTES, run.name
        vllm_config = _vllm_config(model_dir, run, size, monkeypatch)
        assert vllm_config.model_config.max_model_len == size.max_model_len, run.name
        assert vllm_config.cache_config.kv_cache_memory_bytes == size.kv_cache_memory_bytes
        for block_size in sorted({16, vllm_config.cache_config.block_size}):
            _check_kv(vllm_config, hf_config, block_size, size.kv_cache_memory_bytes)
        # at least 4 requests of the longest at once; all 16 when they fit in half of what the weights leave
        assert size.kv_cache_memory_bytes >= 4 * size.request_kv_bytes, run.name
        # negative control: one block short of one longest request is refused
        with pytest.raises(ValueError, match="KV cache is needed"):
            _check_kv(vllm_config, hf_config, 16, size.request_kv_bytes - 16 * per_token)


@pytest.mark.usefixtures("vllm_config_here")
def test_bench_sizes_every_run_for_video_llava_7b(video_llava_7b_config_dir, monkeypatch):
    """With no flag, every run of the default benchmark on Video-LLaVA-7B (bf16, an H100's
    memory) gets a context that holds its longest request and a KV cache that vLLM's own check
    accepts, within the GPU's memory; the old fixed 2 GiB is refused (negative control)."""
    from transformers import AutoConfig, AutoTokenizer

    from intp_vllm.apps.bench.benchmark import Settings, make_rounds
    from intp_vllm.apps.bench.runners import make_runs
    from intp_vllm.apps.bench.sizing import engine_sizes

    settings = Settings()
    hf_config = AutoConfig.from_pretrained(video_llava_7b_config_dir)
    tokenizer = AutoTokenizer.from_pretrained(video_llava_7b_config_dir)
    runs = make_runs((max(settings.frames),), VideoPruning("evs", 0.5))
    requests = [r for requests in make_rounds(settings) for r in requests]
    sizes = engine_sizes(runs, requests, settings.requests, hf_config, tokenizer, 2, H100_FREE_BYTES,
                         VIDEO_LLAVA_7B_WEIGHT_BYTES)
    assert sorted(sizes) == sorted(r.name for r in runs if r.engine == "vllm")
    # the longest: a 32-frame request with 64 new tokens (its question's prompt, <video> -> 32 x 257 tokens),
    # raised to what the plugin starts an engine with for 32 frames (their tokens + 512 for text)
    text_tokens = max(len(tokenizer(f"USER: <video>\n{r.question} ASSISTANT:")["input_ids"]) - 1
                      for r in requests if (r.frames, r.max_tokens) == (32, 64))
    assert text_tokens + 64 < TEXT_MARGIN_TOKENS
    assert sizes["intp_32f"].max_model_len == 32 * 257 + TEXT_MARGIN_TOKENS
    assert sizes["plugin_8f"].max_model_len < 4096 < sizes["intp_32f"].max_model_len
    _check_sizes(video_llava_7b_config_dir, runs, requests, sizes, 257, VIDEO_LLAVA_7B_WEIGHT_BYTES, monkeypatch)
    # the old default (--kv-cache-gib 2) with the engine's own context: the 8-frame run is refused
    old = engine_sizes(runs, requests, settings.requests, hf_config, tokenizer, 2, H100_FREE_BYTES,
                       VIDEO_LLAVA_7B_WEIGHT_BYTES, kv_cache_gib=2.0)["plugin_8f"]
    assert old.kv_cache_memory_bytes == 2 << 30
    plugin_run = next(r for r in runs if r.name == "plugin_8f")
    default_context = _vllm_config(video_llava_7b_config_dir, plugin_run, replace(old, max_model_len=None), monkeypatch)
    assert default_context.model_config.max_model_len == 4096
    with pytest.raises(ValueError, match="KV cache is needed"):
        _check_kv(default_context, hf_config, 16, old.kv_cache_memory_bytes)


LLAVA_NEXT_VIDEO_7B_WEIGHT_BYTES = 14_130_000_000  # the hub's bf16 safetensors, ~7.06e9 parameters


@pytest.fixture(scope="module")
def llava_next_video_7b_config_dir(tmp_path_factory):
    """LLaVA-NeXT-Video-7B's config (Vicuna-7B with linear RoPE x2, vocab 32000; CLIP-L/14 at 336,
    2x2 pooling), tokenizer and preprocessor config, no weights."""
    from intp_vllm.research.tiny_model import (
        build_llava_next_video_config,
        build_tokenizer,
        real_shape_llava_next_video_spec,
        write_preprocessor_config,
    )

    path = tmp_path_factory.mktemp("llava-next-video-7b-config")
    spec = replace(real_shape_llava_next_video_spec(text_layers=32, vision_layers=24), vocab_size=32000)
    tokenizer = build_tokenizer()
    config = build_llava_next_video_config(spec, tokenizer, rope_linear=2.0)
    config.architectures = ["LlavaNextVideoForConditionalGeneration"]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_preprocessor_config(path, spec)
    return path


@pytest.mark.usefixtures("vllm_config_here")
def test_bench_sizes_every_run_for_llava_next_video_7b(llava_next_video_7b_config_dir, monkeypatch):
    """LLaVA-NeXT-Video-7B in bf16 on an H100's memory, videos of 8, 32 and 64 frames, INTP at 32
    and 64 frames: 144 tokens a frame (the adapter's, not Video-LLaVA's 257), no clip padding
    (window 1), every run's context and KV cache accepted by vLLM's own check."""
    from transformers import AutoConfig, AutoTokenizer

    from intp_vllm.apps.bench.benchmark import Settings, make_rounds
    from intp_vllm.apps.bench.runners import make_runs
    from intp_vllm.apps.bench.sizing import engine_sizes

    settings = Settings(frames=(8, 32, 64), intp_frames=(32, 64))
    hf_config = AutoConfig.from_pretrained(llava_next_video_7b_config_dir)
    tokenizer = AutoTokenizer.from_pretrained(llava_next_video_7b_config_dir)
    runs = make_runs(settings.intp_frames, VideoPruning("evs", 0.5))
    assert [r.name for r in runs] == ["hf_generate", "plugin_8f", "intp_32f", "unscaled_32f", "intp_64f",
                                      "unscaled_64f", "intp_64f_evs0.5"]
    requests = [r for requests in make_rounds(settings) for r in requests]
    sizes = engine_sizes(runs, requests, settings.requests, hf_config, tokenizer, 2, H100_FREE_BYTES,
                         LLAVA_NEXT_VIDEO_7B_WEIGHT_BYTES)
    # F x 144 video tokens + 512 for text; 64 frames: 9,728 tokens, past the checkpoint's 2 x 4096
    assert {name: size.max_model_len for name, size in sizes.items()} == {
        "plugin_8f": 8 * 144 + 512, "intp_32f": 32 * 144 + 512, "unscaled_32f": 32 * 144 + 512,
        "intp_64f": 64 * 144 + 512, "unscaled_64f": 64 * 144 + 512, "intp_64f_evs0.5": 64 * 144 + 512}
    _check_sizes(llava_next_video_7b_config_dir, runs, requests, sizes, 144, LLAVA_NEXT_VIDEO_7B_WEIGHT_BYTES,
                 monkeypatch)
