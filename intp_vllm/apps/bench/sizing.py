"""Each vLLM run's context and KV cache, sized from the checkpoint and the run's longest request.

A run's engine gets `max_model_len` = its longest request (prompt with the video's tokens, plus
the new tokens), or the least the plugin starts an engine with for the run's frames (their video
tokens + `TEXT_MARGIN_TOKENS`) where that is more, and a KV cache for `requests` such requests at
once:

    per request = KV bytes per token (core.config: layers x KV heads x head size x 2 x dtype size)
                  x (max_model_len + BLOCK_ALLOWANCE_TOKENS)
    KV cache    = cpu_memory.cpu_kv_cache_bytes(per request, requests, available memory, weight files)

that is all the requests of a round at once, capped at half the device memory left after the
weights, never less than one request (vLLM refuses to start when one `max_model_len` sequence
does not fit). Video-LLaVA-7B in bf16 (512 KiB a token) at 32 frames: 8.7K tokens, 4.5 GiB a
request; LLaVA-NeXT-Video-7B (144 tokens a frame) at 64 frames: 9.7K tokens, 4.8 GiB. Tokens a
frame and the encoder window are the model adapter's. `--kv-cache-gib` given wins over the sizing.
"""

from __future__ import annotations

from dataclasses import dataclass

from intp_vllm.apps.bench.runners import Run, engine_intp
from intp_vllm.apps.bench.workload import Request
from intp_vllm.core.config import TEXT_MARGIN_TOKENS, kv_bytes_per_token, video_tokens
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.vllm_ext.cpu_memory import BLOCK_ALLOWANCE_TOKENS, cpu_kv_cache_bytes
from intp_vllm.vllm_ext.plugin import config_model_class


@dataclass(frozen=True)
class EngineSize:
    """One run's engine settings: `max_model_len` (tokens), `kv_cache_memory_bytes`, and the
    KV bytes one request at `max_model_len` needs (`request_kv_bytes`, what vLLM checks at start)."""

    max_model_len: int
    kv_cache_memory_bytes: int
    request_kv_bytes: int


def run_video_tokens(run: Run, frames: int, hf_config) -> int:
    """Prompt tokens of a video of `frames` frames in `run`'s engine: read at most `run.frames`,
    padded to whole encoder clips, the model adapter's tokens a frame each."""
    return video_tokens(min(frames, run.frames), engine_intp(hf_config, run.intp).encoder_frames,
                        config_model_class(hf_config).tokens_per_frame(hf_config))


def request_tokens(request: Request, run: Run, hf_config, tokenizer) -> int:
    """Prompt tokens of `request` in `run`'s engine (the question's prompt with `<video>` expanded
    to the video's tokens, `run_video_tokens`) plus its new tokens."""
    ids = tokenizer(VIDEO_PROMPT.format(question=request.question))["input_ids"]
    video = run_video_tokens(run, request.frames, hf_config)
    return len(ids) - ids.count(hf_config.video_token_index) + video + request.max_tokens


def available_memory(device: str) -> int:
    """Bytes free for a new engine: the GPU's free memory, or the machine's available RAM."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def engine_sizes(runs: list[Run], requests: list[Request], concurrent: int, hf_config, tokenizer, element_size: int,
                 available: int, weights: int, kv_cache_gib: float | None = None) -> dict[str, EngineSize]:
    """Each vLLM run's `EngineSize` (module docstring): its longest of `requests`, `concurrent` of
    them at once, at `element_size` bytes a KV element, with `available` bytes of device memory
    and `weights` bytes of weight files; `kv_cache_gib` given, every run gets that cache instead."""
    per_token = kv_bytes_per_token(hf_config.text_config, element_size)
    sizes = {}
    for run in runs:
        if run.engine != "vllm":
            continue
        least = TEXT_MARGIN_TOKENS + run_video_tokens(run, run.frames, hf_config)
        longest = max(least, *(request_tokens(r, run, hf_config, tokenizer) for r in requests))
        per_request = per_token * (longest + BLOCK_ALLOWANCE_TOKENS)
        if kv_cache_gib is None:
            cache = cpu_kv_cache_bytes(per_request, concurrent, available, weights)
        else:
            cache = int(kv_cache_gib * 2**30)
        sizes[run.name] = EngineSize(longest, cache, per_token * longest)
    return sizes
